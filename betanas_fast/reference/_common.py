"""What the reference modules share: the activations behind the op schemas' `act` codes."""
import torch.nn.functional as F

# The `act` codes of the op schemas: 0 none, 1 relu6, 2 silu.
_ACT_FUNCTIONS = {0: lambda t: t, 1: F.relu6, 2: F.silu}


def activation(t, act: int):
    """t through the activation with schema code `act`."""
    return _ACT_FUNCTIONS[act](t)
