import pytest
import torch


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    ref, out = ref.float(), out.float()
    return (20 * torch.log10(ref.norm() / (ref - out).norm())).item()


@pytest.fixture(autouse=True)
def _seed_and_reset_dynamo():
    torch.manual_seed(0)
    torch._dynamo.reset()
    yield
