"""What the input format costs: grayscale 1x28x28 vs RGB 3x32x32, and uint8 vs float32 pixels.

The batch category is exactly the bytes of the input tensors, so the ratios follow from the shapes:
- RGB 3x32x32 = 3,072 values per image vs grayscale 1x28x28 = 784: 3.92x the batch bytes;
- uint8 pixels are 1 byte vs 4 for float32: a 4x smaller batch. Convert inside the model
  (``x.float().div_(255)``): the float copy then lives only inside the step, not in the data pipeline
  -- but inside the step it is there, saved for backward, so the peak does not drop 4x.
The models take no target here (the loss is output.sum()), so the batch is the images alone.
"""
import pytest
import torch
from torch import nn

from pytest_gpumem import Category


class Classifier(nn.Module):
    """Flatten + Linear, converting integer pixels to floats in [0, 1] on the device."""

    def __init__(self, image_shape, device):
        super().__init__()
        c, h, w = image_shape
        self.fc = nn.Linear(c * h * w, 10, device=device)

    def forward(self, x):
        if not x.is_floating_point():
            x = x.float().div_(255)  # in place: one float copy, not two
        return self.fc(x.flatten(1))


def measure(gpumem, image_shape, dtype, batch_size=64):
    model = Classifier(image_shape, gpumem.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    if dtype == torch.uint8:
        x = torch.randint(0, 256, (batch_size, *image_shape), dtype=torch.uint8, device=gpumem.device)
    else:
        x = torch.rand(batch_size, *image_shape, device=gpumem.device)
    return gpumem.train_step(model, optimizer, x)


# measured on the emulated backend (torch 2.14.1): peak 1012.50 KiB (RGB); budget = peak + 25%, rounded up
@pytest.mark.gpu_budget("1.25MiB")
def test_grayscale_vs_rgb_batch(gpumem):
    gray = measure(gpumem, (1, 28, 28), torch.float32).category_peak(Category.BATCH)
    rgb = measure(gpumem, (3, 32, 32), torch.float32).category_peak(Category.BATCH)
    assert gray == 64 * 1 * 28 * 28 * 4  # 196 KiB: a multiple of 512 B, so no allocator rounding
    assert rgb * (1 * 28 * 28) == gray * (3 * 32 * 32)  # exactly 3072/784 = 3.92x


# measured on the emulated backend (torch 2.14.1): peak 1.18 MiB (uint8; float32: 1012.50 KiB);
# budget = the larger peak + 25%, rounded up
@pytest.mark.gpu_budget("1.5MiB")
def test_uint8_vs_float32_batch(gpumem):
    u8 = measure(gpumem, (3, 32, 32), torch.uint8)
    f32 = measure(gpumem, (3, 32, 32), torch.float32)
    as_uint8, as_float = u8.category_peak(Category.BATCH), f32.category_peak(Category.BATCH)
    assert as_uint8 == 64 * 3 * 32 * 32  # 1 byte per pixel
    assert as_float == 4 * as_uint8
    # the float copy made in forward is saved for backward (the Linear's input): a uint8 batch does not
    # shrink the step's peak below the float32 one -- its win is a 4x smaller batch in host memory and
    # on the host-to-device copy. (With `x.float() / 255` instead of `.div_(255)` it is one copy worse.)
    assert u8.category_peak(Category.ACTIVATIONS) == as_float
