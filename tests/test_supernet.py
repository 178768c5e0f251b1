import torch
import torch.nn.functional as F

from betanas_fast.nn import Net, Supernet, set_bn_batch_stats_frozen
from betanas_fast.space import build_space


def _space():
    return build_space("demo", num_classes=10, stage_depths=[1, 2, 1, 1])


def test_only_chosen_paths_get_gradients_and_updates():
    torch.manual_seed(0)
    sp = _space()
    net = Supernet(sp)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    arch = [0, 1, 6, 0, 2]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(net(torch.randn(8, 3, 32, 32), arch), torch.arange(8) % 10).backward()
    opt.step()
    for l, block in enumerate(net.blocks):
        for name, path in block.candidates.items():
            chosen = name == sp.candidate_names[arch[l]]
            for p in path.parameters():
                assert (p.grad is not None) == chosen
                if not chosen:
                    assert p not in opt.state or "momentum_buffer" not in opt.state[p]
    after = net.state_dict()
    for k, v in before.items():
        if k.startswith("blocks.") and ".candidates." in k:
            l, name = int(k.split(".")[1]), k.split(".")[3]
            if name != sp.candidate_names[arch[l]]:
                assert torch.equal(v, after[k]), k  # weights and BN statistics untouched


def test_net_from_supernet_matches_path():
    torch.manual_seed(0)
    sp = _space()
    sup = Supernet(sp).eval()
    arch = [3, 0, 6, 5, 1]
    net = Net.from_supernet(sup, arch).eval()
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(net(x), sup(x, arch))


def test_bn_batch_stats_frozen_keeps_running_stats():
    torch.manual_seed(0)
    sup = Supernet(_space()).train()
    before = {k: v.clone() for k, v in sup.state_dict().items()}
    set_bn_batch_stats_frozen(sup, True)
    with torch.no_grad():
        out_frozen = sup(torch.randn(8, 3, 32, 32), [0, 0, 0, 0, 0])
    set_bn_batch_stats_frozen(sup, False)
    assert out_frozen.isfinite().all()
    for k, v in sup.state_dict().items():
        assert torch.equal(v, before[k]), k
