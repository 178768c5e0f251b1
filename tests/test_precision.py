"""Under --amp the weights may train in bf16, but the α gradient must not be steered by rounding: only
the differences between candidates' dL/dg reach α, and bf16 swamps them. The engine's Phase 2 runs in
fp32; its α-gradient signs must agree with a float64 computation on >= 99 % of the entries that matter."""
import copy

import torch

from betanas_fast.search import Search, SearchConfig


def eq4_float64(table: torch.Tensor, alpha: torch.Tensor, remaining: torch.Tensor) -> torch.Tensor:
    """dL/dα_m = Σ_j g_j p_j (δ_mj − p_m) over the remaining paths, in float64, written out."""
    p = torch.softmax(alpha.double().masked_fill(~remaining, float("-inf")), 1)
    g = table.double().masked_fill(~remaining, 0.0)
    weighted = (g * p).sum(1, keepdim=True)
    return (p * (g - weighted)).masked_fill(~remaining, 0.0)


def test_amp_alpha_gradient_signs_agree_with_float64(tmp_path):
    torch.manual_seed(0)
    s = Search(SearchConfig(amp=True, amp_dtype="bf16", out=str(tmp_path / "run"), progress=False, plots=False,
                            tensorboard=False, threads=2, epochs=4, warmup_epochs=0))
    s._build()
    assert s.amp_dtype == torch.bfloat16
    for _ in range(20):   # weights trained in bf16, as the run does
        s.phase1_step()
    st = s.state
    with torch.no_grad():
        st.alpha.copy_(torch.randn(st.alpha.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    model64 = copy.deepcopy(s.model).double()
    gen = torch.Generator().manual_seed(2)
    agree = total = 0
    bf16_agree = 0
    for b in range(4):
        x, y = s.data.heldout.batch(torch.arange(64 * b, 64 * (b + 1)), train=False)
        arch = st.sample_from_p(gen)
        table, _, _ = s.model.gate_grad_table(x, y, arch, st.remaining, autocast=s._phase2_autocast())
        got = st.alpha_grad(table, torch.zeros_like(table), 0.0)
        table64, _, _ = model64.gate_grad_table(x.double(), y, arch, st.remaining)
        want = eq4_float64(table64, st.alpha.detach(), st.remaining)
        bf16_table, _, _ = s.model.gate_grad_table(x, y, arch, st.remaining, autocast=s._autocast())
        bf16 = st.alpha_grad(bf16_table, torch.zeros_like(table), 0.0)
        matters = want.abs() > 0.01 * want.abs().max()
        agree += int((got.double().sign() == want.sign())[matters].sum())
        bf16_agree += int((bf16.double().sign() == want.sign())[matters].sum())
        total += int(matters.sum())
    assert total >= 100
    print(f"α-gradient sign agreement with float64 over {total} entries: engine (fp32 Phase 2) "
          f"{agree / total:.4f}, bf16 Phase 2 {bf16_agree / total:.4f}")
    assert agree / total >= 0.99
