"""The functional distance D between the model's outputs on anchors and their stored reference outputs."""

import torch

from fip_peft.math.distances import functional_distance


def test_token_distance_averages_over_the_valid_positions_of_the_mask():
    outputs, reference = torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)
    outputs[0, 0] = 1.0  # a valid position
    outputs[1, 2] = 5.0  # padding
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert (
        functional_distance(outputs, reference, "logits", mask)
        == functional_distance(outputs[0, 0:1][None], reference[0, 0:1][None], "logits") / 5
    )


def test_token_distance_accepts_a_mask_on_another_device_than_the_outputs():
    # anchors (and their attention mask) stay where the memory is, e.g. CPU, while the model runs on a GPU
    outputs, reference = torch.randn(2, 3, 4, device="meta"), torch.randn(2, 3, 4, device="meta")
    distance = functional_distance(outputs, reference, "logits", torch.ones(2, 3))
    assert distance.device == outputs.device
