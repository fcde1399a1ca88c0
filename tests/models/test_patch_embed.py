"""The shared patch embedding equals torch's own convolutions, and unpatchify inverts patchify."""

import pytest
import torch
import torch.nn.functional as F

from gigatron.core.models.patch_embed import PatchEmbed, patchify, unpatchify


@pytest.mark.parametrize("patch,shape", [((1, 4, 4), (2, 3, 8, 12)), ((2, 4, 4), (2, 3, 4, 8, 12))])
def test_patch_embed_is_the_strided_convolution(patch, shape):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64)
    embed = PatchEmbed(3, 5, patch).double()
    ours = embed(x)
    clip = x if x.dim() == 5 else x.unsqueeze(2)
    conv = F.conv3d(clip, embed.conv_weight(), embed.proj.bias, stride=patch)  # (B, dim, gt, gh, gw)
    torch.testing.assert_close(ours, conv.flatten(2).transpose(1, 2), rtol=0, atol=1e-12)
    assert embed.grid(x) == tuple(conv.shape[2:])
    assert torch.equal(PatchEmbed.linear_weight(embed.conv_weight()), embed.proj.weight)


def test_image_becomes_a_repeated_clip_and_unpatchify_inverts():
    x = torch.randn(2, 3, 4, 8, 8)
    tokens = patchify(x, (2, 4, 4))
    assert tokens.shape == (2, 2 * 2 * 2, 3 * 2 * 4 * 4)
    assert torch.equal(unpatchify(tokens, (2, 2, 2), (2, 4, 4), 3), x)
    image = torch.randn(2, 3, 8, 8)
    assert torch.equal(patchify(image, (2, 4, 4)), patchify(torch.stack([image, image], 2), (2, 4, 4)))
    with pytest.raises(ValueError, match="not divisible by the patch"):
        patchify(torch.randn(1, 3, 9, 8), (1, 4, 4))
