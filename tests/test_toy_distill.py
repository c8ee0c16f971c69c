"""The method against the analytic teacher: a quick version of benchmarks/toy_gmm.py."""

import pytest

from pcm.eval.toy_gmm import distill_student, make_eval_set, make_world, sample_model, score, toy_config


@pytest.fixture(scope="module")
def world_and_eval():
    cfg = toy_config("pcm", 2, guided=True, steps=400)
    world = make_world(cfg)
    return world, make_eval_set(world, 512, w=1.0)


@pytest.mark.slow
def test_two_phase_student_beats_teacher_ddim_and_lcm_at_two_steps(world_and_eval):
    world, ev = world_and_eval
    pcm_cfg = toy_config("pcm", 2, guided=True, steps=400)
    lcm_cfg = toy_config("lcm", 1, guided=True, steps=400)
    pcm_student, _ = distill_student(world, pcm_cfg)
    lcm_student, _ = distill_student(world, lcm_cfg)
    pcm = score(sample_model(world, pcm_student, pcm_cfg, ev, 2, "pcm"), ev)["endpoint_error"]
    ddim = score(sample_model(world, world.teacher, pcm_cfg, ev, 2, "ddim"), ev)["endpoint_error"]
    lcm = score(sample_model(world, lcm_student, lcm_cfg, ev, 2, "lcm"), ev)["endpoint_error"]
    assert pcm < 0.6 * ddim, (pcm, ddim)
    assert pcm < lcm, (pcm, lcm)
