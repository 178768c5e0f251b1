"""Cost models of the search space: analytic multiply-adds and parameter counts."""
from .flops import (arch_cost, candidate_cost_table, candidate_macs, candidate_params, fixed_cost, mflops_table,
                    min_arch_mflops, NetCost)

__all__ = ["arch_cost", "candidate_cost_table", "candidate_macs", "candidate_params", "fixed_cost", "mflops_table",
           "min_arch_mflops", "NetCost"]
