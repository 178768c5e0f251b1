"""Cost models of the search space: analytic multiply-adds and parameter counts (flops), measured latency
look-up tables (latency, measure), and the cost term of Eq. 6 built from either (objective)."""
from .flops import arch_cost, candidate_cost_table, candidate_macs, candidate_params, fixed_cost, mflops_table, NetCost
from .latency import LatencyTable, LatencyTableError
from .objective import COSTS, SearchCost, flops_cost, latency_beta, latency_cost

__all__ = ["arch_cost", "candidate_cost_table", "candidate_macs", "candidate_params", "fixed_cost", "mflops_table",
           "NetCost", "LatencyTable", "LatencyTableError", "COSTS", "SearchCost", "flops_cost",
           "latency_beta", "latency_cost"]
