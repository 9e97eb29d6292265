"""The multi-modal diffusion transformer (adaLN-Zero DiT/SiT) in Flax NNX.

One shared trunk serves both objectives:

* MMGen (decoupled timesteps): the image modalities are concatenated on
  channels before one patch embedding, each modality has its own time (a
  "time slot") and its own output head (FinalLayer); a task embedding says
  which modality, if any, is the clean condition.
* MT-ELBO (multi-task ELBO): one input space and one time, several image
  heads and classifier heads (pooled tokens -> adaLN norm -> logits).

Blocks are named after the DiT paper (`modulate`, `TimestepEmbedder`,
`LabelEmbedder`, `DiTBlock`, `FinalLayer`). Inputs are NHWC; t ∈ [0, 1] is not
rescaled. Label dropout for classifier-free guidance is done by the objective
(it replaces y by the null id `num_classes`), so the forward pass is
deterministic.

With a prompt encoder (`prompt`, models/prompt_encoder.py: UNIMO-G style
text interleaved with entity images), every block also cross-attends from the
image tokens to the prompt's tokens (PixArt-α: after self-attention, keys and
values from the prompt, padded keys masked), and the pooled prompt embedding is
added to the adaLN conditioning c. Both enter through zero-initialised
projections, so a model given a prompt-free checkpoint's weights (new
parameters at their initial values) computes exactly that checkpoint's
outputs. Without `prompt` no such parameter exists.

The trunk's blocks are one stacked `DiTBlock` whose parameters have a leading
'layers' axis, applied with `nnx.scan` (`scan_layers=True`: compile time does
not grow with depth), or a list of blocks applied one after the other
(`scan_layers=False`, the official per-block layout); `models/convert.py`
moves parameters between the two. `remat_policy` says what the backward pass
recomputes (`REMAT_POLICIES`).
"""

from __future__ import annotations

from typing import Any, Sequence

from flax import nnx
from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from mmgen_jax.models import layers
from mmgen_jax.models import prompt_encoder as prompt_lib
from mmgen_jax.models.layers import Numerics, dense, layer_norm, modulate

FREQUENCY_DIM = 256  # sinusoid features per time, as in DiT
LAYERS_AXIS = 'layers'  # logical name of the stacked blocks' leading axis

# What each block keeps for the backward pass; the rest is recomputed.
#   none: everything (fastest, most memory);
#   full: only the block's input, the whole block is recomputed;
#   save_dots: the outputs of the weight matmuls (qkv, projection, MLP, adaLN), so
#     only the cheap parts are recomputed: attention's scores and mix (batched
#     dots, T² per head), norms, GELU. At 256 tokens and width 1152 the weight
#     matmuls are ~95% of a block's FLOPs.
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'save_dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@struct.dataclass
class ModelOutput:
  """What `MMDiT.__call__` returns.

  images: one (N, H, W, C_m) float32 array per image head, in head order.
  logits: one (N, K_c) float32 array per class head.
  zs: one (N, T, z) float32 REPA projection per z_dim (empty without REPA).
  intermediates: name -> array when asked for (`return_intermediates=True`).
  attention: (N, T, L) float32 cross-attention weights of the image tokens on the
    prompt tokens, the mean over blocks and heads, when asked for
    (`return_attention=True`); each row sums to 1 minus the null key's share.
  """
  images: tuple[jax.Array, ...]
  logits: tuple[jax.Array, ...] = ()
  zs: tuple[jax.Array, ...] = ()
  intermediates: dict[str, jax.Array] | None = None
  attention: jax.Array | None = None


class TimestepEmbedder(nnx.Module):
  """Times -> one vector: a shared sinusoid+MLP per time, then a fusing MLP.

  With several time slots (one per modality) the shared MLP maps 256 -> D -> D/2,
  the per-slot embeddings are concatenated (S·D/2) and `fuse` maps them to D
  (MMGen's `mlp` and `mlp_fused`). With one slot it is DiT's 256 -> D -> D MLP and
  `fuse` is the identity. A time given per channel is embedded per channel and
  the embeddings are averaged over each slot's channels.
  """

  def __init__(self, hidden_size: int, time_slots: Sequence[int], *, numerics: Numerics,
               rngs: nnx.Rngs):
    self.time_slots = tuple(int(s) for s in time_slots)
    num_slots = len(self.time_slots)
    slot_dim = hidden_size if num_slots == 1 else hidden_size // 2
    normal = nnx.initializers.normal(0.02)  # DiT initialises the timestep MLP N(0, 0.02)
    self.fc1 = dense(FREQUENCY_DIM, hidden_size, ('freq', 'mlp'), kernel_init=normal,
                     numerics=numerics, rngs=rngs)
    self.fc2 = dense(hidden_size, slot_dim, ('mlp', 'embed'), kernel_init=normal,
                     numerics=numerics, rngs=rngs)
    if num_slots > 1:
      self.fuse_fc1 = dense(num_slots * slot_dim, hidden_size, ('embed', 'mlp'),
                            numerics=numerics, rngs=rngs)
      self.fuse_fc2 = dense(hidden_size, hidden_size, ('mlp', 'embed'),
                            numerics=numerics, rngs=rngs)

  def per_time(self, t: jax.Array) -> jax.Array:
    """Sinusoid + shared MLP for each time: (N, K) -> (N, K, D_slot)."""
    return self.fc2(nnx.silu(self.fc1(layers.timestep_embedding(t, FREQUENCY_DIM))))

  def slot_embeddings(self, t: jax.Array) -> jax.Array:
    """(N,), (N, slots) or (N, channels) times -> concatenated slot embeddings (N, S·D_slot)."""
    t = _times_per_column(t, self.time_slots)
    emb = self.per_time(t)
    if t.shape[1] != len(self.time_slots):  # one time per channel: average each slot
      emb = layers.segment_mean(emb, self.time_slots, axis=1)
    return emb.reshape(emb.shape[0], -1)

  def fuse(self, slot_emb: jax.Array) -> jax.Array:
    if len(self.time_slots) == 1:
      return slot_emb
    return self.fuse_fc2(nnx.silu(self.fuse_fc1(slot_emb)))

  def __call__(self, t: jax.Array) -> jax.Array:
    return self.fuse(self.slot_embeddings(t))


def _times_per_column(t: jax.Array, time_slots: tuple[int, ...]) -> jax.Array:
  """Checks the time layout and returns t as (N, slots) or (N, channels)."""
  slots, channels = len(time_slots), sum(time_slots)
  if t.ndim == 1:  # one time for the whole sample
    return jnp.repeat(t[:, None], slots, axis=1)
  if t.ndim == 2 and t.shape[1] in (slots, channels):
    return t
  raise ValueError(f't has shape {t.shape}; expected (N,), (N, {slots}) one time per slot, '
                   f'or (N, {channels}) one time per channel (time_slots={time_slots}).')


class LabelEmbedder(nnx.Module):
  """An embedding table (class labels, or MMGen task indices), init N(0, init_std²).

  For class labels with classifier-free guidance the table has one extra row,
  the null class `num_classes`; dropping labels is the objective's job.
  DiT/SiT initialise the label table with std 0.02; MMGen's task table is a
  plain `nn.Embedding`, std 1.
  """

  def __init__(self, num_embeddings: int, hidden_size: int, *, numerics: Numerics,
               rngs: nnx.Rngs, init_std: float = 0.02):
    self.num_embeddings = num_embeddings
    self.embedding_table = nnx.Embed(
        num_embeddings, hidden_size,
        embedding_init=nnx.with_partitioning(nnx.initializers.normal(init_std),
                                             ('vocab', 'embed')),
        dtype=numerics.dtype, param_dtype=numerics.param_dtype, rngs=rngs)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return self.embedding_table(ids)


class DiTBlock(nnx.Module):
  """Transformer block with adaptive LayerNorm-Zero conditioning on c.

  With context_dim > 0 (a prompt encoder of that width) the block cross-attends
  from its LayerNorm-ed tokens to the prompt between self-attention and the MLP
  (PixArt-α; PixArt feeds the raw tokens as queries), with one learned null
  key/value beside the prompt's and a zero-initialised output projection.
  """

  def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, *,
               qk_norm: bool = False, context_dim: int = 0, numerics: Numerics,
               rngs: nnx.Rngs):
    self.attn = layers.Attention(hidden_size, num_heads, qk_norm=qk_norm, numerics=numerics,
                                 rngs=rngs)
    if context_dim:
      self.cross_attn = prompt_lib.MaskedAttention(
          hidden_size, context_dim, num_heads, zero_out=True, null_kv=True, numerics=numerics,
          rngs=rngs)
    self.mlp = layers.Mlp(hidden_size, int(hidden_size * mlp_ratio), numerics=numerics, rngs=rngs)
    # Zero-init: every block starts as the identity.
    self.adaln_modulation = dense(hidden_size, 6 * hidden_size, ('embed', 'mlp'), zero_init=True,
                                  numerics=numerics, rngs=rngs)

  def __call__(self, x: jax.Array, c: jax.Array,
               context: prompt_lib.PromptFeatures | None = None, *,
               return_attention: bool = False):
    """x (N, T, D) -> (N, T, D); with return_attention also the (N, T, L) cross-attention."""
    mod = self.adaln_modulation(nnx.silu(c))[:, None, :]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
    x = x + gate_msa * self.attn(modulate(layer_norm(x), shift_msa, scale_msa))
    probs = None
    if context is not None:
      if not hasattr(self, 'cross_attn'):
        raise ValueError('a prompt was given to a block without cross-attention '
                         '(the model was built without config.prompt).')
      out = self.cross_attn(layer_norm(x), context.tokens, context.mask,
                            return_probs=return_attention)
      out, probs = out if return_attention else (out, None)
      x = x + out
    x = x + gate_mlp * self.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp))
    return (x, probs) if return_attention else x


class FinalLayer(nnx.Module):
  """adaLN norm + linear to p·p·C patch values, zero-initialised (outputs 0 at init)."""

  def __init__(self, hidden_size: int, patch_size: int, out_channels: int, *,
               numerics: Numerics, rngs: nnx.Rngs):
    self.adaln_modulation = dense(hidden_size, 2 * hidden_size, ('embed', 'mlp'),
                                  zero_init=True, numerics=numerics, rngs=rngs)
    self.linear = dense(hidden_size, patch_size * patch_size * out_channels, ('embed', None),
                        zero_init=True, numerics=numerics, rngs=rngs)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    shift, scale = jnp.split(self.adaln_modulation(nnx.silu(c))[:, None, :], 2, axis=-1)
    return self.linear(modulate(layer_norm(x), shift, scale)).astype(jnp.float32)


class ClassHead(nnx.Module):
  """Classifier head (MT-ELBO): mean-pooled tokens -> adaLN norm -> logits, zero-init."""

  def __init__(self, hidden_size: int, num_classes: int, *, numerics: Numerics,
               rngs: nnx.Rngs):
    self.adaln_modulation = dense(hidden_size, 2 * hidden_size, ('embed', 'mlp'),
                                  zero_init=True, numerics=numerics, rngs=rngs)
    self.linear = dense(hidden_size, num_classes, ('embed', 'vocab'), zero_init=True,
                        numerics=numerics, rngs=rngs)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    shift, scale = jnp.split(self.adaln_modulation(nnx.silu(c)), 2, axis=-1)
    pooled = x.astype(jnp.float32).mean(axis=1)
    return self.linear(modulate(layer_norm(pooled), shift, scale)).astype(jnp.float32)


class MMDiT(nnx.Module):
  """Multi-modal DiT: concatenated inputs, shared trunk, one head per output."""

  def __init__(self, *, input_size: int, patch_size: int, in_channels: int,
               image_heads: Sequence[int], time_slots: Sequence[int],
               class_heads: Sequence[int] = (), hidden_size: int, depth: int, num_heads: int,
               mlp_ratio: float = 4.0, qk_norm: bool = False, num_classes: int,
               class_dropout_prob: float, num_tasks: int = 0, task_embed_init_std: float = 0.02,
               repa_encoder_depth: int = 0,
               repa_z_dims: Sequence[int] = (), repa_projector_dim: int = 2048,
               prompt: dict[str, Any] | None = None,
               scan_layers: bool = True, scan_unroll: int = 1, remat_policy: str = 'none',
               batch_axes: str | Sequence[str] | None = None,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               precision: jax.lax.PrecisionLike = None, rngs: nnx.Rngs):
    """Builds the model.

    Args:
      input_size: height = width of the (latent) input.
      patch_size: p; input_size must be a multiple of it.
      in_channels: channels of the concatenated input.
      image_heads: output channels per image head (FinalLayer), in order.
      time_slots: channels per time slot; they must add up to in_channels. MMGen:
        one slot per modality, e.g. (4, 4, 4, 4); one time for all: (in_channels,).
      class_heads: number of classes per classifier head (MT-ELBO).
      num_classes: class labels; with class_dropout_prob > 0 the table gets one
        more row, the null class `num_classes` used for guidance.
      num_tasks: task table rows - 1 (0 = joint, m+1 = modality m is the
        condition); 0 disables the task embedding. task_embed_init_std: its
        init std (MMGen's nn.Embedding: 1).
      repa_encoder_depth: REPA projectors read the output of this block
        (1-based); 0 disables them. repa_z_dims: one projector per z_dim.
      prompt: `prompt_encoder.PromptEncoder` arguments (models/build.py's
        `prompt_kwargs`): adds the encoder, cross-attention in every block and
        the pooled embedding's projection into c; None: none of them exist.
      scan_layers: the blocks as one stacked module run by `nnx.scan` (True), or
        as a list `blocks.0`, `blocks.1`, ... run one by one (False).
      scan_unroll: blocks per scan iteration (`jax.lax.scan`'s unroll); `depth`
        gives one straight-line program, whose FLOPs XLA counts in full (it
        counts a loop's body once).
      remat_policy: what the backward pass recomputes, one of REMAT_POLICIES.
      batch_axes: mesh axes the batch is split over (the 'batch' sharding rule).
        Under a mesh the scanned trunk keeps its activations split so: left to
        itself the partitioner may gather the batch inside the loop to keep the
        stacked weights split (measured: 30x the temporaries, SiT-XL/2 on 32
        devices).
      dtype / param_dtype / precision: compute dtype, storage dtype, matmul precision.
    """
    self.input_size, self.patch_size = input_size, patch_size
    self.in_channels = in_channels
    self.image_heads, self.class_head_sizes = tuple(image_heads), tuple(class_heads)
    self.hidden_size, self.depth = hidden_size, depth
    self.num_classes, self.num_tasks = num_classes, num_tasks
    self.repa_encoder_depth = repa_encoder_depth
    self.scan_layers, self.scan_unroll = scan_layers, scan_unroll
    self.remat_policy = remat_policy
    self.batch_axes = tuple(batch_axes) if isinstance(batch_axes, (list, tuple)) else batch_axes
    _check_args(input_size, patch_size, in_channels, image_heads, time_slots, hidden_size,
                depth, num_tasks, repa_encoder_depth, repa_z_dims, scan_unroll, remat_policy)
    numerics = Numerics(dtype=dtype, param_dtype=param_dtype, precision=precision)
    kw = dict(numerics=numerics, rngs=rngs)

    self.x_embedder = layers.PatchEmbed(patch_size, in_channels, hidden_size, **kw)
    self.t_embedder = TimestepEmbedder(hidden_size, time_slots, **kw)
    self.y_embedder = LabelEmbedder(num_classes + int(class_dropout_prob > 0), hidden_size, **kw)
    self.task_embedder = (LabelEmbedder(num_tasks + 1, hidden_size, init_std=task_embed_init_std,
                                        **kw) if num_tasks else None)
    if prompt:
      self.prompt_encoder = prompt_lib.PromptEncoder(**prompt, batch_axes=self.batch_axes, **kw)
      # Zero-init: the pooled prompt leaves c unchanged at the start.
      self.prompt_proj = dense(self.prompt_encoder.width, hidden_size, ('mlp', 'embed'),
                               zero_init=True, **kw)
    else:
      self.prompt_encoder = None
    context_dim = self.prompt_encoder.width if prompt else 0
    make_block = lambda r: DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm=qk_norm,
                                    context_dim=context_dim, numerics=numerics, rngs=r)
    if scan_layers:
      self.blocks = _stacked_blocks(make_block, depth, rngs)
    else:
      self.blocks = nnx.List([make_block(rngs) for _ in range(depth)])
    self.projectors = nnx.List([
        layers.MlpProjector(hidden_size, repa_projector_dim, z, **kw) for z in repa_z_dims])
    self.final_layers = nnx.List([
        FinalLayer(hidden_size, patch_size, ch, **kw) for ch in self.image_heads])
    self.class_heads = nnx.List([ClassHead(hidden_size, k, **kw) for k in self.class_head_sizes])

  @property
  def null_class(self) -> int | None:
    """Label id of the unconditional (guidance) embedding, None without one."""
    rows = self.y_embedder.num_embeddings
    return self.num_classes if rows > self.num_classes else None

  @property
  def grid_size(self) -> int:
    return self.input_size // self.patch_size

  def pos_embed(self) -> np.ndarray:
    """The fixed (T, D) sin-cos table (not a parameter)."""
    return layers.sincos_pos_embed_2d(self.hidden_size, self.grid_size, self.grid_size)

  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, task: jax.Array | None = None,
               *, prompt: prompt_lib.Prompt | None = None, return_intermediates: bool = False,
               return_attention: bool = False) -> ModelOutput:
    """Predicts every head's output for noisy input x at times t.

    Args:
      x: (N, H, W, in_channels), the modalities concatenated on channels.
      t: times in [0, 1]: (N,) one for all slots, (N, slots) one per slot, or
        (N, in_channels) one per channel (averaged per slot after embedding).
      y: (N,) int class ids; `null_class` (= num_classes) is the unconditional id.
        Ids out of range are not checked inside jit.
      task: (N,) int task ids (0 = joint, m+1 = slot m is the condition), or
        None for all 0.
      prompt: a batch of multimodal prompts (models with a prompt encoder). None
        on such a model is the empty prompt (what prompt guidance calls "none").
      return_intermediates: also return the named activations (tests, debugging).
      return_attention: also return the cross-attention weights on the prompt
        (`ModelOutput.attention`; models with a prompt encoder).
    """
    n, h, w, ch = x.shape
    if (h, w, ch) != (self.input_size, self.input_size, self.in_channels):
      raise ValueError(f'x has shape {x.shape}; expected (N, {self.input_size}, '
                       f'{self.input_size}, {self.in_channels}) (NHWC).')
    if task is not None and self.task_embedder is None:
      raise ValueError('task was given but the model has no task embedding (num_tasks=0).')
    if self.prompt_encoder is None and (prompt is not None or return_attention):
      raise ValueError('a prompt (or its attention) was asked of a model without a prompt '
                       'encoder; build it with config.prompt.name set.')
    record = {} if return_intermediates else None
    def keep(name, value):
      if record is not None:
        record[name] = value

    x_patch = self.x_embedder(x)
    tokens = x_patch.astype(jnp.float32) + self.pos_embed()  # residual stream in float32
    keep('x_patch', x_patch)
    keep('x_tokens', tokens)

    if record is not None:
      keep('t_freq', layers.timestep_embedding(
          _times_per_column(t, self.t_embedder.time_slots), FREQUENCY_DIM))
    t_slots = self.t_embedder.slot_embeddings(t)
    t_emb = self.t_embedder.fuse(t_slots)
    y_emb = self.y_embedder(y)
    c = t_emb + y_emb
    keep('t_emb_concat', t_slots)
    keep('t_emb', t_emb)
    keep('y_emb', y_emb)
    if self.task_embedder is not None:
      task_emb = self.task_embedder(jnp.zeros((n,), jnp.int32) if task is None else task)
      c = c + task_emb
      keep('task_emb', task_emb)
    context = None
    if self.prompt_encoder is not None:
      context = (self.prompt_encoder(prompt) if prompt is not None
                 else prompt_lib.empty_features(n, self.prompt_encoder.width))
      c = c + self.prompt_proj(context.pooled)
      keep('prompt_tokens', context.tokens)
      keep('prompt_pooled', context.pooled)
    keep('c', c)

    # REPA reads the output of block k: the trunk runs as blocks [0, k), then [k, depth).
    zs = ()
    attention = []
    cuts = sorted({0, self.repa_encoder_depth, self.depth})
    for lo, hi in zip(cuts[:-1], cuts[1:]):
      tokens, outputs, maps = self._run_blocks(lo, hi, tokens, c, context,
                                               keep_outputs=record is not None,
                                               return_attention=return_attention)
      attention.extend(maps)
      for i, out in enumerate(outputs, start=lo):
        keep(f'blocks.{i}', out)
      if hi == self.repa_encoder_depth:
        zs = tuple(p(tokens).astype(jnp.float32) for p in self.projectors)
        for j, z in enumerate(zs):
          keep(f'zs.{j}', z)

    images = []
    for m, head in enumerate(self.final_layers):
      out = head(tokens, c)
      keep(f'final_layer.{m}', out)
      images.append(layers.unpatchify(out, self.patch_size, self.grid_size, self.grid_size))
    logits = tuple(head(tokens, c) for head in self.class_heads)
    return ModelOutput(images=tuple(images), logits=logits, zs=zs, intermediates=record,
                       attention=(sum(attention) / len(attention)) if return_attention else None)

  def _run_blocks(self, lo: int, hi: int, x: jax.Array, c: jax.Array,
                  context: prompt_lib.PromptFeatures | None, *, keep_outputs: bool,
                  return_attention: bool = False
                  ) -> tuple[jax.Array, list[jax.Array], list[jax.Array]]:
    """Blocks lo, ..., hi-1 applied to x.

    Returns x, each block's output (with keep_outputs) and each block's
    cross-attention weights (with return_attention).
    """
    call = _block_call(self.remat_policy, scanned=self.scan_layers,
                       return_attention=return_attention)
    if not self.scan_layers:
      outputs, maps = [], []
      for i in range(lo, hi):
        x, probs = call(self.blocks[i], x, c, context)
        outputs.append(x)
        maps.append(probs)
      return x, outputs if keep_outputs else [], maps if return_attention else []

    # The prompt features enter unconstrained: constraining this loop-invariant input
    # like x inside the body gave wrong values on a (2, 2, 2) CPU mesh (jax 0.10.2;
    # tests/test_prompt_model.py compares the sharded loss with one device's).
    def step(block, x, c, context):
      x, probs = call(block, _split_batch(x, self.batch_axes), c, context)
      return x, (x if keep_outputs else None, probs)

    # The blocks change no state, so the scan propagates no updates: that also serves a
    # model merged from arrays closed over by an outer loop (samplers), which nnx.scan
    # could not update in place.
    stack = self.blocks if (lo, hi) == (0, self.depth) else _layer_range(self.blocks, lo, hi)
    x, (stacked, maps) = nnx.scan(
        step, in_axes=(0, nnx.Carry, None, None), out_axes=(nnx.Carry, 0),
        unroll=self.scan_unroll, graph_updates=False)(stack, x, c, context)
    return x, list(stacked) if keep_outputs else [], list(maps) if return_attention else []


def _split_batch(x: jax.Array, batch_axes: str | tuple[str, ...] | None) -> jax.Array:
  """x with its leading (batch) axis split over `batch_axes` under a mesh; else x."""
  if batch_axes is None or jax.sharding.get_abstract_mesh().empty:
    return x
  spec = jax.sharding.PartitionSpec(batch_axes, *[jax.sharding.PartitionSpec.UNCONSTRAINED] *
                                    (x.ndim - 1))
  return jax.lax.with_sharding_constraint(x, spec)


def _stacked_blocks(make_block, depth: int, rngs: nnx.Rngs) -> DiTBlock:
  """`depth` independently initialised blocks as one module, parameters (depth, ...)."""
  @nnx.split_rngs(splits=depth)
  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
  def create(rngs):
    return make_block(rngs)
  return create(rngs)


def _layer_range(stack: DiTBlock, lo: int, hi: int) -> DiTBlock:
  """The stacked blocks lo, ..., hi-1 (a view for the forward pass; gradients flow back)."""
  graphdef, state = nnx.split(stack)
  return nnx.merge(graphdef, jax.tree.map(lambda a: a[lo:hi], state))


def _block_call(remat_policy: str, *, scanned: bool, return_attention: bool = False):
  """(block, x, c, context) -> (x, cross-attention or None), recomputed in the backward
  pass as `remat_policy` says."""
  def call(block, x, c, context):
    if context is None:  # the prompt-free block, called exactly as before
      return block(x, c), None
    if return_attention:
      return block(x, c, context, return_attention=True)
    return block(x, c, context), None
  policy = REMAT_POLICIES[remat_policy]
  if policy is None:
    return call
  # Inside a scan the loop already keeps XLA from merging the recomputation with
  # the forward pass, so CSE prevention would only cost speed (as in maxtext).
  return nnx.remat(call, policy=policy, prevent_cse=not scanned)


def _check_args(input_size, patch_size, in_channels, image_heads, time_slots, hidden_size,
                depth, num_tasks, repa_encoder_depth, repa_z_dims, scan_unroll,
                remat_policy) -> None:
  if input_size % patch_size:
    raise ValueError(f'input_size={input_size} is not a multiple of patch_size={patch_size}.')
  if sum(time_slots) != in_channels or min(time_slots, default=0) < 1:
    raise ValueError(f'time_slots={tuple(time_slots)} must be positive channel counts adding '
                     f'up to in_channels={in_channels}.')
  if not image_heads:
    raise ValueError('image_heads is empty: the model needs at least one image head.')
  if len(time_slots) > 1 and hidden_size % 2:
    raise ValueError(f'hidden_size={hidden_size} must be even with several time slots.')
  if num_tasks < 0:
    raise ValueError(f'num_tasks={num_tasks} must be >= 0.')
  if bool(repa_encoder_depth) != bool(len(repa_z_dims)):
    raise ValueError(f'repa_encoder_depth={repa_encoder_depth} and repa_z_dims='
                     f'{tuple(repa_z_dims)}: set both (REPA on) or neither (off).')
  if repa_encoder_depth and not 1 <= repa_encoder_depth <= depth:
    raise ValueError(f'repa_encoder_depth={repa_encoder_depth} must be in [1, depth={depth}].')
  if scan_unroll < 1:
    raise ValueError(f'scan_unroll={scan_unroll} must be >= 1 (blocks per scan iteration).')
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(f'remat_policy={remat_policy!r} is not one of {list(REMAT_POLICIES)}.')


def count_params(model: nnx.Module) -> int:
  """Number of trainable values (nnx.Param leaves); works on abstract models too."""
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  return sum(int(np.prod(leaf.shape)) for leaf in leaves)
