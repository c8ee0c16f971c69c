"""Solver grid tau (N points on [0, T)), phase edges, and the phase lookup m(n)."""

from dataclasses import dataclass, field

import torch


def solver_grid(T: int, N: int) -> torch.Tensor:
    """tau_n = (n + 1) * T/N - 1 for n = 0..N-1 ("trailing": tau_{N-1} = T - 1); shape (N,), int64."""
    if N < 1 or T % N != 0:
        raise ValueError(f"num_solver_steps N={N} must divide num_train_timesteps T={T}")
    return (torch.arange(N, dtype=torch.int64) + 1) * (T // N) - 1


def phase_edge_index(N: int, M: int) -> torch.Tensor:
    """e_m = floor(m * N / M) for m = 0..M-1: the grid index where phase m starts; shape (M,), int64."""
    if not 1 <= M <= N:
        raise ValueError(f"num_phases M={M} must satisfy 1 <= M <= N={N}")
    return torch.arange(M, dtype=torch.int64) * N // M


def prev_timestep(tau: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """t' = tau_{n-1}, with tau_{-1} = 0; n (B,) -> (B,)."""
    return torch.where(n > 0, tau[(n - 1).clamp(min=0)], torch.zeros_like(n))


def phase_of(n: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
    """m(n) = max{m : e_m <= n}; n (B,) -> (B,)."""
    return torch.searchsorted(edge_index, n, right=True) - 1


@dataclass(frozen=True)
class SolverGrid:
    """The discretized teacher ODE (N steps on T timesteps) cut into M phases; holds the index tensors."""

    T: int  # num_train_timesteps
    N: int  # num_solver_steps
    M: int  # num_phases
    tau: torch.Tensor = field(init=False, repr=False)  # (N,) timestep of grid index n
    edge_index: torch.Tensor = field(init=False, repr=False)  # (M,) e_m
    edges: torch.Tensor = field(init=False, repr=False)  # (M,) s_m = tau_{e_m - 1}, s_0 = 0

    def __post_init__(self):
        tau = solver_grid(self.T, self.N)
        edge_index = phase_edge_index(self.N, self.M)
        object.__setattr__(self, "tau", tau)
        object.__setattr__(self, "edge_index", edge_index)
        object.__setattr__(self, "edges", prev_timestep(tau, edge_index))

    def t(self, n: torch.Tensor) -> torch.Tensor:
        """t = tau_n."""
        return self.tau[n]

    def t_prev(self, n: torch.Tensor) -> torch.Tensor:
        """t' = tau_{n-1} (0 for n = 0)."""
        return prev_timestep(self.tau, n)

    def phase(self, n: torch.Tensor) -> torch.Tensor:
        """m(n)."""
        return phase_of(n, self.edge_index)

    def s(self, n: torch.Tensor) -> torch.Tensor:
        """s = s_{m(n)}: the edge that the phased consistency function maps grid index n to."""
        return self.edges[self.phase(n)]

    def at_edge(self, n: torch.Tensor) -> torch.Tensor:
        """True where n = e_{m(n)}, i.e. where the solver step from t lands exactly on the edge s."""
        return self.edge_index[self.phase(n)] == n

    def sampling_timesteps(self) -> list[int]:
        """The trained path T-1 -> s_{M-1} -> ... -> s_0 (M jumps, M + 1 points)."""
        return [self.T - 1] + [int(s) for s in self.edges.flip(0)]
