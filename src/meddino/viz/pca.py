"""PCA feature maps (seed 000 fig. 2, seed 001) and CLS-to-patch attention maps.

The PCA colouring itself (joint fit over a set of images, optional background removal) lives in
:mod:`meddino.models.pca`, below pretraining, which logs the same map at its end; its names are re-exported
here.
"""

from __future__ import annotations

import torch

from meddino.models.pca import fit_pca, patch_feature_grids, pca_rgb


@torch.no_grad()
def cls_attention_maps(backbone: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Last block's attention of the CLS query to every patch, per head: [B, heads, h, w].

    Recomputed from the block's own qkv projection (fused kernels do not return weights); RoPE is applied
    to the patch queries/keys for DINOv3 exactly as the block does.
    """
    if getattr(backbone, "version", "cnn") == "cnn":
        raise ValueError("attention maps need a ViT backbone")
    tokens, rope, (h, w) = backbone.prepare_tokens(images)
    tokens = backbone.run_blocks(tokens, rope, 0, backbone.depth - 1)
    block = backbone.blocks[-1]
    attn = block.attn
    x = block.norm1(tokens)
    batch, n, dim = x.shape
    heads = attn.num_heads
    if backbone.uses_rope:
        bias = None
        if getattr(attn, "q_bias", None) is not None:
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = torch.nn.functional.linear(x, attn.qkv.weight, bias)
    else:
        qkv = attn.qkv(x)
    q, k, _ = qkv.reshape(batch, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    prefix = backbone.num_prefix_tokens
    if rope is not None:
        from timm.layers import apply_rot_embed_cat

        half = getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :prefix], apply_rot_embed_cat(q[:, :, prefix:], rope, half=half)], dim=2)
        k = torch.cat([k[:, :, :prefix], apply_rot_embed_cat(k[:, :, prefix:], rope, half=half)], dim=2)
    scale = getattr(attn, "scale", (dim // heads) ** -0.5)
    weights = ((q[:, :, :1] @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
    return weights[:, :, 0, prefix:].reshape(batch, heads, h, w)


__all__ = ["cls_attention_maps", "fit_pca", "patch_feature_grids", "pca_rgb"]
