"""Teachers and students as eps_fn(x_t, t, cond): the analytic Gaussian-mixture teacher, toy MLP student."""
