"""Multimodal prompts (UNIMO-G style): text interleaved with images of entities.

A prompt is a fixed-length sequence of L word ids from a closed vocabulary
(`mmgen_jax.data.prompts.VOCAB`) in which entity k's image takes the R
consecutive '<ent>' slots marked k + 1 in `entity` (the batch contract:
`prompt_tokens`, `prompt_mask`, `prompt_entity`, `entity_images`). The encoder:

1. embeds every word id (`token_embed`);
2. encodes each entity image with a small strided conv net (`EntityImageEncoder`)
   and resamples its feature map to R tokens with a Perceiver-style resampler
   (R learned latent queries cross-attending to [image tokens; latents]);
3. writes resampler token r of entity k into the r-th slot marked k + 1 (the
   word embedding of '<ent>' is replaced there), adds an entity-index embedding
   (row k + 1 on entity k's slots, row 0 on words) and a learned position
   embedding;
4. runs a small pre-LayerNorm transformer whose attention ignores the padded
   keys (`mask` False).

It returns per-token features (N, L, D), the mask, and the masked mean of the
features (N, D), the pooled embedding. Masked positions carry values that no
consumer reads: the DiT's cross-attention and the pooling both use the mask,
so a padded token's content changes nothing.

Condition dropout works on the mask alone (`drop_condition`): dropping the text
masks every word, dropping the entities masks every '<ent>' slot (leaving the
text-only prompt a stage-1 model was trained on), dropping both leaves an empty
prompt. The DiT's cross-attention always also sees one learned null key/value,
so an empty prompt is well defined (and equals calling the model with no prompt).

Every parameter carries logical axis names from the model's rules table
('vocab', 'embed', 'mlp', 'heads', 'kv', 'length', 'channels').
"""

from __future__ import annotations

from typing import Any, Sequence

from flax import nnx
from flax import struct
import jax
import jax.numpy as jnp

from mmgen_jax.models import layers
from mmgen_jax.models.layers import Numerics, dense, layer_norm, matmul

# Added to the scores of masked keys: exp() of it underflows to exactly 0 in float32,
# and, unlike -inf, a query whose keys are all masked stays finite.
MASKED_LOGIT = -1e9

# Batch fields of a prompt (the data contract, /mmgen_jax/data/prompts.py).
TOKENS, MASK, ENTITY, IMAGES = 'prompt_tokens', 'prompt_mask', 'prompt_entity', 'entity_images'
FIELDS = (TOKENS, MASK, ENTITY, IMAGES)


@struct.dataclass
class Prompt:
  """One batch of prompts (arrays; a pytree, so it goes through jit and scans).

  tokens: (N, L) int word ids; mask: (N, L) bool, True on real tokens (words and
  entity slots); entity: (N, L) int, k + 1 on entity k's R slots, 0 elsewhere;
  entity_images: (N, K, S, S, 3), uint8 (0..255) or float in [-1, 1], or None
  for text-only prompts (then `entity` must be all 0).
  """
  tokens: jax.Array
  mask: jax.Array
  entity: jax.Array
  entity_images: jax.Array | None = None

  @property
  def shape(self) -> tuple[int, int]:
    return tuple(self.tokens.shape)


@struct.dataclass
class PromptFeatures:
  """The encoder's output: tokens (N, L, D) float32, mask (N, L) bool, pooled (N, D) float32."""
  tokens: jax.Array
  mask: jax.Array
  pooled: jax.Array


def from_batch(batch: Any) -> Prompt | None:
  """The prompt held by a batch dict (contract field names), None without `prompt_tokens`."""
  if TOKENS not in batch:
    return None
  missing = [k for k in (MASK, ENTITY) if k not in batch]
  if missing:
    raise KeyError(f'batch has {TOKENS!r} but not {missing}; a prompt needs {list(FIELDS[:3])} '
                   f'(and {IMAGES!r} for entity images). Batch keys: {sorted(batch)}.')
  return Prompt(tokens=batch[TOKENS], mask=batch[MASK].astype(bool), entity=batch[ENTITY],
                entity_images=batch.get(IMAGES))


def drop_condition(prompt: Prompt, drop_text: jax.Array, drop_entities: jax.Array) -> Prompt:
  """The prompt with its words (drop_text) and/or entity slots (drop_entities) masked.

  drop_text, drop_entities: (N,) bool per sample, or scalars. The token ids and
  images stay: a masked token is never read.
  """
  is_slot = prompt.entity > 0
  keep_text = ~jnp.asarray(drop_text, bool).reshape(-1, 1)
  keep_entities = ~jnp.asarray(drop_entities, bool).reshape(-1, 1)
  keep = jnp.where(is_slot, keep_entities, keep_text)
  return prompt.replace(mask=prompt.mask & keep)


def guidance_passes(prompt: Prompt) -> Prompt:
  """The three prompts of prompt guidance, stacked on the batch: [none; text only; full]."""
  n = prompt.tokens.shape[0]
  none = drop_condition(prompt, jnp.ones((n,), bool), jnp.ones((n,), bool))
  text = drop_condition(prompt, jnp.zeros((n,), bool), jnp.ones((n,), bool))
  return jax.tree.map(lambda *a: jnp.concatenate(a), none, text, prompt)


def combine_guidance(v_none: jax.Array, v_text: jax.Array, v_full: jax.Array,
                     text_scale: float | jax.Array, entity_scale: float | jax.Array) -> jax.Array:
  """Prompt guidance with separate text and entity scales (as OmniGen's image guidance):

    v = v_none + text_scale (v_text - v_none) + entity_scale (v_full - v_text).

  v_none: no prompt; v_text: the prompt without its entity images; v_full: the
  whole prompt. Scales 1 give v_full; text_scale = 0 keeps the text out, etc.
  """
  return v_none + text_scale * (v_text - v_none) + entity_scale * (v_full - v_text)


def empty_features(n: int, width: int) -> PromptFeatures:
  """The features of an all-masked prompt (what `model(..., prompt=None)` attends to)."""
  return PromptFeatures(tokens=jnp.zeros((n, 1, width), jnp.float32),
                        mask=jnp.zeros((n, 1), bool), pooled=jnp.zeros((n, width), jnp.float32))


# ---- attention with a key-padding mask ------------------------------------------


class MaskedAttention(nnx.Module):
  """Multi-head attention of queries x (N, T, D_q) over a context (N, L, D_kv).

  `mask` (N, L) bool marks the keys that count. With `null_kv` one learned key
  and value are always attended as well, so a query whose context is all masked
  still gets a defined output. `zero_out` zeroes the output projection (kernel
  and bias): the layer then adds exactly 0 at initialisation.
  Kernels: q (D_q, heads, hd), kv (D_kv, 2, heads, hd), out (heads, hd, D_out).
  """

  def __init__(self, q_dim: int, kv_dim: int, num_heads: int, *, out_dim: int | None = None,
               zero_out: bool = False, null_kv: bool = False, numerics: Numerics,
               rngs: nnx.Rngs):
    if q_dim % num_heads:
      raise ValueError(f'width {q_dim} is not divisible by num_heads={num_heads}.')
    out_dim = q_dim if out_dim is None else out_dim
    self.num_heads, self.head_dim = num_heads, q_dim // num_heads
    self.numerics = numerics
    pd, hd = numerics.param_dtype, q_dim // num_heads
    xavier = layers.xavier_uniform
    self.q_kernel = nnx.Param(xavier(in_axis=0, out_axis=(1, 2))(
        rngs.params(), (q_dim, num_heads, hd), pd), out_sharding=('embed', 'heads', 'kv'))
    self.q_bias = nnx.Param(jnp.zeros((num_heads, hd), pd), out_sharding=('heads', 'kv'))
    self.kv_kernel = nnx.Param(xavier(in_axis=0, out_axis=(1, 2, 3))(
        rngs.params(), (kv_dim, 2, num_heads, hd), pd), out_sharding=('embed', None, 'heads', 'kv'))
    self.kv_bias = nnx.Param(jnp.zeros((2, num_heads, hd), pd), out_sharding=(None, 'heads', 'kv'))
    out_init = layers.zeros if zero_out else xavier(in_axis=(0, 1), out_axis=2)
    self.out_kernel = nnx.Param(out_init(rngs.params(), (num_heads, hd, out_dim), pd),
                                out_sharding=('heads', 'kv', 'embed'))
    self.out_bias = nnx.Param(jnp.zeros((out_dim,), pd), out_sharding=('embed',))
    self.null_kv = (nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (2, num_heads, hd), pd),
                              out_sharding=(None, 'heads', 'kv')) if null_kv else None)

  def __call__(self, x: jax.Array, context: jax.Array, mask: jax.Array | None = None, *,
               return_probs: bool = False):
    """(N, T, D_out) float32; with return_probs also the head-mean weights (N, T, L) on the context."""
    num = self.numerics
    n, length = context.shape[:2]
    q = matmul('btd,dhk->bhtk', x, self.q_kernel[...], num) + self.q_bias[...][:, None]
    kv = matmul('bld,dshk->sbhlk', context, self.kv_kernel[...], num)
    kv = kv + self.kv_bias[...][:, None, :, None]
    k, v = kv[0], kv[1]  # (N, heads, L, hd)
    mask = jnp.ones((n, length), bool) if mask is None else mask.astype(bool)
    if self.null_kv is not None:
      null = jnp.broadcast_to(self.null_kv[...].astype(jnp.float32)[:, None, :, None],
                              (2, n, self.num_heads, 1, self.head_dim))
      k, v = jnp.concatenate([k, null[0]], axis=2), jnp.concatenate([v, null[1]], axis=2)
      mask = jnp.concatenate([mask, jnp.ones((n, 1), bool)], axis=1)
    logits = matmul('bhtk,bhlk->bhtl', q, k, num) * self.head_dim ** -0.5
    logits = logits + jnp.where(mask, 0.0, MASKED_LOGIT)[:, None, None, :]
    probs = layers.softmax(logits)
    out = matmul('bhtl,bhlk->bhtk', probs, v, num)
    out = matmul('bhtk,hkd->btd', out, self.out_kernel[...], num) + self.out_bias[...]
    if not return_probs:
      return out
    return out, probs[..., :length].mean(axis=1)


class EncoderBlock(nnx.Module):
  """Pre-LayerNorm transformer block: masked self-attention, then an MLP."""

  def __init__(self, width: int, num_heads: int, mlp_ratio: float, *, numerics: Numerics,
               rngs: nnx.Rngs):
    self.attn = MaskedAttention(width, width, num_heads, numerics=numerics, rngs=rngs)
    self.mlp = layers.Mlp(width, int(width * mlp_ratio), numerics=numerics, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    h = layer_norm(x)
    x = x + self.attn(h, h, mask)
    return x + self.mlp(layer_norm(x))


# ---- entity images ---------------------------------------------------------------


class EntityImageEncoder(nnx.Module):
  """Entity image (S, S, 3) -> (S / 2^n)² tokens of the prompt width.

  n strided 3×3 convolutions (SiLU between them), a linear map to the width and
  a learned position embedding per feature-map cell.
  """

  def __init__(self, image_size: int, widths: Sequence[int], width: int, *, numerics: Numerics,
               rngs: nnx.Rngs):
    down = 2 ** len(widths)
    if image_size % down:
      raise ValueError(f'entity_size={image_size} is not divisible by 2^{len(widths)} = {down} '
                       f'(one halving per conv of entity_widths={tuple(widths)}).')
    self.image_size = image_size
    self.num_tokens = (image_size // down) ** 2
    convs = []
    for c_in, c_out in zip((3, *widths[:-1]), widths):
      convs.append(nnx.Conv(
          c_in, c_out, (3, 3), strides=2, padding='SAME', dtype=numerics.dtype,
          param_dtype=numerics.param_dtype, precision=numerics.precision,
          kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                            (None, None, None, 'channels')),
          bias_init=nnx.with_partitioning(layers.zeros, ('channels',)), rngs=rngs))
    self.convs = nnx.List(convs)
    self.proj = dense(widths[-1], width, (None, 'embed'), numerics=numerics, rngs=rngs)
    self.pos_embed = nnx.Param(nnx.initializers.normal(0.02)(
        rngs.params(), (self.num_tokens, width), numerics.param_dtype),
        out_sharding=('length', 'embed'))

  def __call__(self, images: jax.Array) -> jax.Array:
    """(M, S, S, 3) -> (M, tokens, width) float32."""
    if images.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(f'entity_images have shape {images.shape[1:]} per entity; expected '
                       f'({self.image_size}, {self.image_size}, 3) (config.prompt.entity_size).')
    h = _to_signed_unit(images)
    for i, conv in enumerate(self.convs):
      h = conv(h).astype(jnp.float32)
      if i + 1 < len(self.convs):
        h = nnx.silu(h)
    h = h.reshape(h.shape[0], -1, h.shape[-1])
    return self.proj(h) + self.pos_embed[...].astype(jnp.float32)


def _to_signed_unit(images: jax.Array) -> jax.Array:
  """uint8 0..255 -> [-1, 1]; float images are taken as already in [-1, 1]."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 127.5 - 1.0
  return images.astype(jnp.float32)


class Resampler(nnx.Module):
  """Perceiver-style resampler: R learned latents read a token set, layer by layer.

  Each layer: latents += attention(LN(latents) over LN([tokens; latents])), then
  latents += MLP(LN(latents)); a final LayerNorm.
  """

  def __init__(self, width: int, num_latents: int, depth: int, num_heads: int, mlp_ratio: float,
               *, numerics: Numerics, rngs: nnx.Rngs):
    self.latents = nnx.Param(nnx.initializers.normal(0.02)(
        rngs.params(), (num_latents, width), numerics.param_dtype),
        out_sharding=('length', 'embed'))
    self.attns = nnx.List([MaskedAttention(width, width, num_heads, numerics=numerics, rngs=rngs)
                           for _ in range(depth)])
    self.mlps = nnx.List([layers.Mlp(width, int(width * mlp_ratio), numerics=numerics, rngs=rngs)
                          for _ in range(depth)])

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """(M, T, width) -> (M, R, width) float32."""
    m = tokens.shape[0]
    lat = jnp.broadcast_to(self.latents[...].astype(jnp.float32), (m, *self.latents.shape))
    for attn, mlp in zip(self.attns, self.mlps):
      h = layer_norm(lat)
      lat = lat + attn(h, jnp.concatenate([layer_norm(tokens), h], axis=1))
      lat = lat + mlp(layer_norm(lat))
    return layer_norm(lat)


# ---- the encoder -----------------------------------------------------------------


class PromptEncoder(nnx.Module):
  """Interleaved words and entity images -> per-token features and a pooled embedding."""

  def __init__(self, *, vocab_size: int, width: int, depth: int, num_heads: int,
               entity_tokens: int, max_tokens: int, max_entities: int, entity_size: int,
               entity_widths: Sequence[int] = (32, 64), resampler_depth: int = 1,
               mlp_ratio: float = 4.0, batch_axes: str | tuple[str, ...] | None = None,
               numerics: Numerics, rngs: nnx.Rngs):
    """batch_axes: the mesh axes the batch is split over (the model's 'batch' rule)."""
    for key, value in (('vocab_size', vocab_size), ('width', width), ('heads', num_heads),
                       ('entity_tokens', entity_tokens), ('max_tokens', max_tokens),
                       ('max_entities', max_entities)):
      if value < 1:
        raise ValueError(f'config.prompt.{key}={value} must be >= 1.')
    if depth < 0 or resampler_depth < 1 or not entity_widths:
      raise ValueError(f'config.prompt: depth={depth} must be >= 0, resampler_depth='
                       f'{resampler_depth} >= 1 and entity_widths={tuple(entity_widths)} '
                       'non-empty.')
    self.width, self.max_tokens = width, max_tokens
    self.batch_axes = tuple(batch_axes) if isinstance(batch_axes, (list, tuple)) else batch_axes
    self.entity_tokens, self.max_entities = entity_tokens, max_entities
    kw = dict(numerics=numerics, rngs=rngs)
    embed = lambda rows: nnx.Embed(
        rows, width, embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02),
                                                          ('vocab', 'embed')),
        dtype=jnp.float32, param_dtype=numerics.param_dtype, rngs=rngs)
    self.token_embed = embed(vocab_size)
    self.entity_index_embed = embed(max_entities + 1)  # row 0: words
    self.pos_embed = nnx.Param(nnx.initializers.normal(0.02)(
        rngs.params(), (max_tokens, width), numerics.param_dtype), out_sharding=('length', 'embed'))
    self.image_encoder = EntityImageEncoder(entity_size, entity_widths, width, **kw)
    self.resampler = Resampler(width, entity_tokens, resampler_depth, num_heads, mlp_ratio, **kw)
    self.layers = nnx.List([EncoderBlock(width, num_heads, mlp_ratio, **kw) for _ in range(depth)])

  def entity_features(self, images: jax.Array) -> jax.Array:
    """(N, K, S, S, 3) -> (N, K, R, width): R resampled tokens per entity image."""
    n, k = images.shape[:2]
    if k != self.max_entities:
      raise ValueError(f'entity_images hold {k} entities per sample; expected '
                       f'config.prompt.max_entities={self.max_entities}.')
    tokens = self.resampler(self.image_encoder(images.reshape(n * k, *images.shape[2:])))
    # Split over the batch alone: left to itself, XLA's partitioner computed wrong
    # resampler outputs (already before the reshape; the image encoder's were right)
    # in a value-and-grad program of the whole model on a (2, 2, 2) CPU mesh (jax
    # 0.10.2), though no constraint can change values. The constraint needs a mesh
    # while tracing: `train_state.jit_train_step` traces under its own; any other
    # sharded jit of a prompt model must trace inside `jax.set_mesh(mesh)`.
    return _batch_only(tokens, self.batch_axes).reshape(n, k, self.entity_tokens, self.width)

  def __call__(self, prompt: Prompt) -> PromptFeatures:
    n, length = prompt.tokens.shape
    if length > self.max_tokens:
      raise ValueError(f'prompts have {length} tokens; the encoder takes at most '
                       f'config.prompt.max_tokens={self.max_tokens}.')
    if prompt.mask.shape != (n, length) or prompt.entity.shape != (n, length):
      raise ValueError(f'prompt mask {prompt.mask.shape} and entity {prompt.entity.shape} must '
                       f'have the shape of its tokens {(n, length)}.')
    entity = prompt.entity.astype(jnp.int32)
    h = self.token_embed(prompt.tokens.astype(jnp.int32)).astype(jnp.float32)
    if prompt.entity_images is not None:
      slots = _entity_slot_index(entity, self.max_entities, self.entity_tokens)
      feats = self.entity_features(prompt.entity_images).reshape(n, -1, self.width)
      h = jnp.where((entity > 0)[..., None],
                    jnp.take_along_axis(feats, slots[..., None], axis=1), h)
    h = h + self.entity_index_embed(jnp.clip(entity, 0, self.max_entities)).astype(jnp.float32)
    h = h + self.pos_embed[...][:length].astype(jnp.float32)
    mask = prompt.mask.astype(bool)
    for block in self.layers:
      h = block(h, mask)
    h = layer_norm(h)
    weights = mask.astype(jnp.float32)[..., None]
    pooled = (h * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)
    return PromptFeatures(tokens=h, mask=mask, pooled=pooled)


def _batch_only(x: jax.Array, batch_axes: str | tuple[str, ...] | None) -> jax.Array:
  """x split over `batch_axes` on its leading axis, whole on the others (under a mesh).

  Without an active mesh it does nothing: a jit given NamedShardings shows no mesh
  to the traced code, so a sharded program traced outside the mesh goes without it.
  """
  if batch_axes is None or jax.sharding.get_abstract_mesh().empty:
    return x
  spec = jax.sharding.PartitionSpec(batch_axes, *[None] * (x.ndim - 1))
  return jax.lax.with_sharding_constraint(x, spec)


def _entity_slot_index(entity: jax.Array, max_entities: int, entity_tokens: int) -> jax.Array:
  """(N, L) -> index into the (K·R) entity tokens: k·R + r on the r-th slot marked k + 1.

  The contract gives each entity exactly R slots (`check_prompt_arrays` says so on
  the host); inside jit a slot beyond the R-th would reuse token R - 1.
  """
  one_hot = entity[..., None] == jnp.arange(1, max_entities + 1)  # (N, L, K)
  rank = (jnp.cumsum(one_hot, axis=1) - 1) * one_hot
  r = jnp.minimum(rank.sum(-1), entity_tokens - 1)
  k = jnp.clip(entity - 1, 0, max_entities - 1)
  return k * entity_tokens + r


def check_prompt_arrays(batch: Any, *, max_tokens: int, entity_tokens: int, max_entities: int,
                        entity_size: int, vocab_size: int) -> None:
  """Host-side check of a numpy batch against the contract; raises naming the field.

  What jit cannot check: ids in range, exactly R consecutive slots per entity
  given as an image, slots only where the mask is on.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  tokens, mask, entity = (np.asarray(batch[k]) for k in (TOKENS, MASK, ENTITY))
  n = tokens.shape[0]
  if tokens.shape != (n, max_tokens):
    raise ValueError(f'batch[{TOKENS!r}] has shape {tokens.shape}; expected (N, '
                     f'config.prompt.max_tokens={max_tokens}).')
  for key, arr in ((MASK, mask), (ENTITY, entity)):
    if arr.shape != tokens.shape:
      raise ValueError(f'batch[{key!r}] has shape {arr.shape}; expected {tokens.shape}.')
  if tokens.min() < 0 or tokens.max() >= vocab_size:
    raise ValueError(f'batch[{TOKENS!r}] holds ids in [{tokens.min()}, {tokens.max()}]; the '
                     f'vocabulary has {vocab_size} words.')
  if entity.min() < 0 or entity.max() > max_entities:
    raise ValueError(f'batch[{ENTITY!r}] holds {entity.max()}; expected 0 or k + 1 for k < '
                     f'{max_entities}.')
  if np.any((entity > 0) & ~mask.astype(bool)):
    raise ValueError(f'batch[{ENTITY!r}] marks slots that batch[{MASK!r}] leaves out.')
  for i in range(n):
    for k in np.unique(entity[i][entity[i] > 0]):
      where = np.flatnonzero(entity[i] == k)
      if len(where) != entity_tokens or where[-1] - where[0] != entity_tokens - 1:
        raise ValueError(f'sample {i}: entity {k - 1} has slots at {where.tolist()}; expected '
                         f'{entity_tokens} consecutive slots (config.prompt.entity_tokens).')
  if IMAGES in batch:
    images = np.asarray(batch[IMAGES])
    want = (n, max_entities, entity_size, entity_size, 3)
    if images.shape != want:
      raise ValueError(f'batch[{IMAGES!r}] has shape {images.shape}; expected {want}.')
  elif np.any(entity > 0):
    raise ValueError(f'batch[{ENTITY!r}] marks entity slots but the batch has no {IMAGES!r}.')
