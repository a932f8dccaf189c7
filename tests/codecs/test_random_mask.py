import subprocess
import sys

import pytest
import torch

from fedpeft.codecs import CodecContext, RandomMask


def test_decode_equals_masked_delta() -> None:
    context = CodecContext(0, 1, 4)
    codec = RandomMask(density=0.25)
    delta = {"w": torch.randn(10, 20)}
    decoded = codec.decode(codec.encode(delta, context, {}), context, {"w": torch.zeros(10, 20)})["w"]
    mask = torch.zeros(200, dtype=torch.bool)
    mask[codec.mask_indices("w", 200, context)] = True
    mask = mask.reshape(10, 20)
    assert int(mask.sum()) == 50
    torch.testing.assert_close(decoded, torch.where(mask, delta["w"], torch.zeros(())), rtol=0, atol=0)


def test_payload_is_values_only() -> None:
    payload = RandomMask(density=0.1).encode({"w": torch.randn(100)}, CodecContext(0, 1, 0), {})
    assert list(payload) == ["w"] and payload["w"].numel() == 10


def test_masks_differ_by_round_and_client() -> None:
    codec = RandomMask(density=0.1)
    masks = {
        tuple(codec.mask_indices("w", 1000, CodecContext(0, r, c)).tolist()) for r in (1, 2) for c in (0, 1)
    }
    assert len(masks) == 4


def test_client_and_server_processes_draw_the_same_mask() -> None:
    script = (
        "from fedpeft.codecs import CodecContext, RandomMask;"
        "print(RandomMask(density=0.05).mask_indices('layer.lora_A', 4096, CodecContext(7, 3, 2)).tolist())"
    )
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    here = RandomMask(density=0.05).mask_indices("layer.lora_A", 4096, CodecContext(7, 3, 2)).tolist()
    assert other.strip() == str(here)


def test_rescaled_estimate_is_unbiased() -> None:
    delta = {"w": torch.linspace(-1, 1, 64)}
    total = torch.zeros(64)
    trials = 4000
    codec = RandomMask(density=0.25, rescale=True)
    for seed in range(trials):
        context = CodecContext(seed, 1, 0)
        total += codec.decode(codec.encode(delta, context, {}), context, {"w": torch.zeros(64)})["w"]
    # each entry's mean over 4000 draws: std of a single draw is |x| sqrt(3), so 5 sigma ~ 0.14 |x|
    torch.testing.assert_close(total / trials, delta["w"], rtol=0, atol=0.14)


def test_bad_density_is_refused() -> None:
    with pytest.raises(ValueError, match="density"):
        RandomMask(density=0.0)
