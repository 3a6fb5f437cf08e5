"""kiln.diffusers.apply: checks that kiln knows every part of a model, then swaps the forwards.

Nothing is changed until every check has passed, so a model kiln does not know is refused whole
(kiln.UnsupportedError naming the part), never run half on kiln. What apply changes, all undone
by Handle.remove():
  - the forward of each transformer block (an instance attribute over the class's forward), and
    with fp8 weights the forward of each model-level nn.Linear and of norm_out;
  - the transformer's forward: argument checks, then CUDA graphs (kiln.diffusers._graphs);
  - with fp8 weights, the bf16 weights kiln holds as fp8 (moved to host memory while applied,
    unless offload_replaced=False); with bf16 weights, the Q/K/V weights of a block become views
    of one fused weight;
  - the VAE: the forward of every decoder nn.Conv2d, ResnetBlock2D and the Decoder, and the
    mid-block attention's processor (Attention.set_processor).

diffusers' context-parallel hooks (model.enable_parallelism with a ContextParallelConfig, before
or after apply) stay outermost: kiln's forwards go beneath them (kiln.diffusers._parallel).
"""

import contextlib
import inspect
import logging

import torch

from .._C import InvalidArgumentError, UnsupportedError
from . import _graphs, _linear, _parallel, _transformer, _vae
from ._linear import Mode, Originals

log = logging.getLogger("kiln.diffusers")

DIFFUSERS_VERSION = "0.42.1"  # the diffusers release these forwards mirror and the tests pin
_WEIGHTS = ("fp8", "bf16")
_ACTIVATIONS = ("auto", "fp8", "bf16")


def _refuse(what: str) -> None:
    raise UnsupportedError(f"kiln.diffusers.apply: {what}")


def _qualname(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


# The names diffusers gives the hooks of its context parallelism (hooks/context_parallel.py):
# the model's input split and proj_out's output gather.
_CONTEXT_PARALLEL_HOOKS = ("cp_input---", "cp_output---")


def _diffusers_hooks(module) -> list:
    registry = getattr(module, "_diffusers_hook", None)
    return list(getattr(registry, "hooks", None) or ())


def _only_context_parallel_hooks(module) -> bool:
    hooks = _diffusers_hooks(module)
    return bool(hooks) and all(name.startswith(_CONTEXT_PARALLEL_HOOKS) for name in hooks)


@contextlib.contextmanager
def _beneath_hooks(module):
    """A change of module.forward made beneath diffusers' hooks: each hook wraps the forward it
    found (an instance attribute), so the module's hooks are taken off (newest first, through
    its HookRegistry), the change made, and the same hooks registered again in their order."""
    registry = getattr(module, "_diffusers_hook", None)
    names = _diffusers_hooks(module)
    hooks = [registry.hooks[name] for name in names]
    for name in reversed(names):
        registry.remove_hook(name, recurse=False)
    try:
        yield
    finally:
        for name, hook in zip(names, hooks):
            registry.register_hook(hook, name)


class _Swaps:
    """Instance attributes set over a module's own (forward, usually), undone in reverse. A
    forward goes beneath the module's diffusers hooks (context parallelism's) and is taken out
    from beneath them, whether they came before apply or after."""

    def __init__(self):
        self._undo = []

    def forward(self, module, forward) -> None:
        with _beneath_hooks(module):
            module.forward = forward

        def undo():
            with _beneath_hooks(module):
                module.__dict__.pop("forward", None)

        self._undo.append(undo)

    def processor(self, attn, processor) -> None:
        old = attn.processor
        attn.set_processor(processor)
        self._undo.append(lambda: attn.set_processor(old))

    def mark(self, module, handle) -> None:
        module._kiln_handle = handle
        self._undo.append(lambda: module.__dict__.pop("_kiln_handle", None))

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


def _check_free(name: str, module) -> None:
    """Refuses a module that something else already took over: kiln, accelerate's or diffusers'
    hooks (offloading, caching, layerwise casting), torch.compile, PEFT adapters."""
    if getattr(module, "_kiln_handle", None) is not None:
        _refuse(f"{name} is already on kiln: call remove() on its handle first")
    if getattr(module, "_hf_hook", None) is not None:
        _refuse(f"{name} has accelerate hooks (CPU offload or device_map dispatch), which kiln "
                "does not run under; load it onto one device without them")
    parallel = getattr(module, "_parallel_config", None)
    if parallel is not None and parallel.tensor_parallel_config is not None:
        _refuse(f"{name} has tensor parallelism on (a TensorParallelConfig): kiln's blocks hold "
                "whole weights and run diffusers' context parallelism only")
    for sub_name, sub in module.named_modules():
        where = f"{name}.{sub_name}" if sub_name else name
        hooks = _diffusers_hooks(sub)
        if hooks and not _only_context_parallel_hooks(sub):
            _refuse(f"{where} has diffusers hooks ({', '.join(sorted(hooks))}): caching, group "
                    "offloading or layerwise casting; disable them first (context "
                    "parallelism's are the ones kiln runs under)")
        replaced = "forward" in sub.__dict__ and not hooks
        if replaced or getattr(sub, "_compiled_call_impl", None) is not None:
            _refuse(f"{name}.{sub_name or '(root)'} has its forward replaced or compiled "
                    "already (torch.compile, compile_repeated_blocks, another patch)")
    if getattr(module, "_hf_peft_config_loaded", False):
        _refuse(f"{name} has PEFT (LoRA) adapters loaded; fuse_lora() and unload_lora_weights() "
                "first")


def _check_device(name: str, module) -> torch.device:
    devices = {p.device for p in module.parameters()}
    if len(devices) != 1:
        _refuse(f"{name} has parameters on {sorted(map(str, devices))}, expected one device")
    device = devices.pop()
    if device.type not in ("cpu", "cuda"):
        _refuse(f"{name} is on {device}, expected cpu or cuda")
    return device


def _resolve_mode(weights: str, activations: str, device: torch.device) -> Mode:
    if weights not in _WEIGHTS:
        raise InvalidArgumentError(
            f"kiln.diffusers.apply: weights is {weights!r}, expected 'fp8' or 'bf16'")
    if activations not in _ACTIVATIONS:
        raise InvalidArgumentError(
            f"kiln.diffusers.apply: activations is {activations!r}, expected 'auto', 'fp8' or "
            "'bf16'")
    if weights == "bf16":
        if activations == "fp8":
            raise InvalidArgumentError(
                "kiln.diffusers.apply: activations='fp8' needs weights='fp8' (bf16 weights run "
                "bf16 GEMMs)")
        return Mode("bf16", "bf16")
    if activations == "auto":
        fp8_cores = device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)
        activations = "fp8" if fp8_cores else "bf16"
    return Mode("fp8", activations)


# ---- transformer ---------------------------------------------------------------------------------


def _transformer_classes():
    from diffusers.models.transformers import transformer_flux as flux1
    from diffusers.models.transformers import transformer_flux2 as flux2

    return {
        flux2.Flux2Transformer2DModel: dict(
            double=(flux2.Flux2TransformerBlock, flux2.Flux2AttnProcessor,
                    _transformer.Flux2DoubleBlock),
            single=(flux2.Flux2SingleTransformerBlock, flux2.Flux2ParallelSelfAttnProcessor,
                    _transformer.Flux2SingleBlock)),
        flux1.FluxTransformer2DModel: dict(
            double=(flux1.FluxTransformerBlock, flux1.FluxAttnProcessor,
                    _transformer.FluxDoubleBlock),
            single=(flux1.FluxSingleTransformerBlock, flux1.FluxAttnProcessor,
                    _transformer.FluxSingleBlock)),
    }


def _check_transformer(model, family) -> None:
    name = type(model).__name__
    _check_free(name, model)
    for kind, blocks in (("double", model.transformer_blocks),
                         ("single", model.single_transformer_blocks)):
        block_cls, processor_cls, _ = family[kind]
        for i, block in enumerate(blocks):
            where = f"{name}.{'single_' if kind == 'single' else ''}transformer_blocks.{i}"
            if type(block) is not block_cls:
                _refuse(f"{where} is a {_qualname(block)}, expected {block_cls.__qualname__}")
            attn = block.attn
            if type(attn.processor) is not processor_cls:
                _refuse(f"{where}.attn has processor {_qualname(attn.processor)}, expected "
                        f"{processor_cls.__qualname__} (KV-cache and IP-adapter processors run "
                        "on diffusers)")
            if getattr(attn, "fused_projections", False):
                _refuse(f"{where}.attn has fused QKV projections; call "
                        "unfuse_qkv_projections() first (kiln fuses them itself)")
            head_dim = attn.head_dim
            if head_dim % 8 != 0 or head_dim > _vae.MAX_ATTENTION_HEAD_DIM:
                _refuse(f"{where}.attn has head dim {head_dim}, expected a multiple of 8 up to "
                        f"{_vae.MAX_ATTENTION_HEAD_DIM} (kiln.attention)")
    known = _transformer.KNOWN_TOP_LEVEL[name]
    for sub_name, sub in model.named_modules():
        if not isinstance(sub, torch.nn.Linear):
            continue
        _linear.check_plain_linear(f"{name}.{sub_name}", sub)
        in_blocks = sub_name.startswith(("transformer_blocks.", "single_transformer_blocks."))
        if not in_blocks and not sub_name.startswith(known):
            _refuse(f"{name}.{sub_name} is a linear layer kiln does not know (an adapter's?)")


class _TransformerPatch:
    def __init__(self, model, family, mode: Mode, graphs: bool, offload: bool):
        self.model = model
        self.family = family
        self.mode = mode
        self.graphs = graphs and _check_device(type(model).__name__, model).type == "cuda"
        self.offload = offload and mode.weights == "fp8"
        self.swaps = _Swaps()
        self.originals = Originals()
        self.kiln_linears = []
        self.runner = None
        self.parallel = _parallel.ContextParallel(model)

    def install(self, handle) -> str:
        model, mode = self.model, self.mode
        rotary = _transformer.RotaryTable()
        link = dict(mode=mode, rotary=rotary, originals=self.originals, offload=self.offload,
                    parallel=self.parallel)
        blocks = []
        for kind, modules in (("double", model.transformer_blocks),
                              ("single", model.single_transformer_blocks)):
            kiln_cls = self.family[kind][2]
            for block in modules:
                kiln_block = kiln_cls(block, **link)
                blocks.append(kiln_block)
                self.swaps.forward(block, kiln_block.forward)
        if mode.weights == "fp8":
            for sub_name, sub in model.named_modules():
                if not isinstance(sub, torch.nn.Linear) or sub_name.startswith(
                        ("transformer_blocks.", "single_transformer_blocks.")):
                    continue
                per_batch = sub_name not in _transformer.TOKEN_LINEARS
                linear = _linear.single(sub, mode=mode, originals=self.originals,
                                        offload=self.offload, per_batch=per_batch)
                self.kiln_linears.append(linear)
                self.swaps.forward(sub, linear.__call__)
        self.swaps.forward(model.norm_out, _transformer.NormOut(model.norm_out).forward)
        original = type(model).forward.__get__(model)
        if self.graphs:
            self.runner = _graphs.GraphedForward(original, type(model).__name__,
                                                 ranks=self.parallel)
        forward = self.runner if self.runner is not None else original
        checked = _checked_forward(model, original, forward, self.parallel)
        self.swaps.forward(model, checked)
        self.swaps.mark(model, handle)
        held = sum(lin.nbytes for b in blocks for lin in _linears_of(b)) + sum(
            lin.nbytes for lin in self.kiln_linears)
        originals = ", bf16 originals on the host" if self.offload else ""
        return (f"{type(model).__name__}: {len(model.transformer_blocks)} double-stream and "
                f"{len(model.single_transformer_blocks)} single-stream blocks on kiln "
                f"(weights {mode.weights}, activations {mode.activations}, "
                f"{held / 2**20:.0f} MiB of GEMM weights{originals}), "
                f"CUDA graphs {'on' if self.graphs else 'off'}")

    def remove(self) -> None:
        self.swaps.undo()
        self.originals.restore()
        if self.runner is not None:
            self.runner.graphs.clear()  # the captured graphs' memory pools go with them


def _linears_of(block):
    for value in vars(block).values():
        if isinstance(value, (_linear.Linear, _linear.SplitLinear)):
            yield value
        elif isinstance(value, tuple):
            yield from (v for v in value if isinstance(v, (_linear.Linear, _linear.SplitLinear)))


def _checked_forward(model, original, forward, parallel):
    """The model's forward behind a check of the arguments kiln's blocks cannot serve (Flux.2's
    reference-image KV cache), with the context-parallel layout of the call set for the blocks
    (kiln.diffusers._parallel: diffusers' split hook, if any, has run before)."""
    signature = inspect.signature(original)
    name = type(model).__name__

    def checked(*args, **kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        if bound.get("kv_cache_mode") is not None or bound.get("kv_cache") is not None:
            raise UnsupportedError(
                f"kiln.diffusers: {name} called with a reference-image KV cache (kv_cache_mode="
                f"{bound.get('kv_cache_mode')!r}); kiln runs plain forwards: call "
                "handle.remove() first")
        parallel.begin(bound["hidden_states"], bound["encoder_hidden_states"])
        try:
            return forward(*args, **kwargs)
        finally:
            parallel.end()

    return checked


# ---- VAE -----------------------------------------------------------------------------------------


def _vae_classes():
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.autoencoders.autoencoder_kl_flux2 import AutoencoderKLFlux2

    return (AutoencoderKLFlux2, AutoencoderKL)


def _check_vae(vae) -> None:
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
    from diffusers.models.autoencoders.vae import Decoder
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, UpDecoderBlock2D
    from diffusers.models.upsampling import Upsample2D

    name = type(vae).__name__
    _check_free(name, vae)
    decoder = vae.decoder
    if type(decoder) is not Decoder:
        _refuse(f"{name}.decoder is a {_qualname(decoder)}, expected Decoder")
    if type(decoder.conv_norm_out) is not torch.nn.GroupNorm or type(
            decoder.conv_act) is not torch.nn.SiLU:
        _refuse(f"{name}.decoder ends in {_qualname(decoder.conv_norm_out)} + "
                f"{_qualname(decoder.conv_act)}, expected GroupNorm + SiLU (a spatial-norm "
                "decoder)")
    if type(decoder.mid_block) is not UNetMidBlock2D:
        _refuse(f"{name}.decoder.mid_block is a {_qualname(decoder.mid_block)}, expected "
                "UNetMidBlock2D")
    for i, up in enumerate(decoder.up_blocks):
        if type(up) is not UpDecoderBlock2D:
            _refuse(f"{name}.decoder.up_blocks.{i} is a {_qualname(up)}, expected "
                    "UpDecoderBlock2D")
        for j, sampler in enumerate(up.upsamplers or []):
            if (type(sampler) is not Upsample2D or not sampler.use_conv or sampler.norm is not None
                    or sampler.use_conv_transpose or not sampler.interpolate):
                _refuse(f"{name}.decoder.up_blocks.{i}.upsamplers.{j}: expected a nearest x2 "
                        "Upsample2D with a convolution")
    for sub_name, sub in decoder.named_modules():
        where = f"{name}.decoder.{sub_name}"
        if type(sub) is ResnetBlock2D:
            if (sub.time_emb_proj is not None or sub.upsample is not None
                    or sub.downsample is not None or type(sub.nonlinearity) is not torch.nn.SiLU
                    or (sub.training and sub.dropout.p > 0)):
                _refuse(f"{where}: expected a ResnetBlock2D with SiLU and no time embedding, "
                        "resampling or active dropout")
        elif type(sub) is Attention:
            if (type(sub.processor) not in (AttnProcessor2_0, AttnProcessor)
                    or sub.group_norm is None or sub.spatial_norm is not None
                    or sub.norm_q is not None or sub.norm_k is not None or sub.is_cross_attention):
                _refuse(f"{where}: expected the VAE's self-attention over pixels (GroupNorm, "
                        "no spatial norm or QK norm, default processor), got processor "
                        f"{_qualname(sub.processor)}")
        elif isinstance(sub, torch.nn.Conv2d):
            _check_conv(where, sub)
    if vae.post_quant_conv is not None:
        _check_conv(f"{name}.post_quant_conv", vae.post_quant_conv)


def _check_conv(where: str, conv) -> None:
    if (type(conv) is not torch.nn.Conv2d or conv.groups != 1 or conv.padding_mode != "zeros"
            or isinstance(conv.padding, str)):
        _refuse(f"{where}: expected a plain Conv2d (groups 1, numeric zero padding), got "
                f"{_qualname(conv)} groups {conv.groups} padding {conv.padding!r} "
                f"({conv.padding_mode})")


class _VaePatch:
    def __init__(self, vae):
        self.vae = vae
        self.swaps = _Swaps()

    def install(self, handle) -> str:
        from diffusers.models.attention_processor import Attention
        from diffusers.models.resnet import ResnetBlock2D

        vae = self.vae
        counts = {"conv": 0, "resnet": 0, "attention": 0}
        convs = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
        if vae.post_quant_conv is not None:
            convs.append(vae.post_quant_conv)
        for conv in convs:
            self.swaps.forward(conv, _vae.Conv(conv).forward)
            counts["conv"] += 1
        for sub in vae.decoder.modules():
            if type(sub) is ResnetBlock2D:
                self.swaps.forward(sub, _vae.Resnet(sub).forward)
                counts["resnet"] += 1
            elif type(sub) is Attention:
                self.swaps.processor(sub, _vae.VaeAttnProcessor(sub))
                counts["attention"] += 1
        self.swaps.forward(vae.decoder, _vae.Decoder(vae.decoder).forward)
        self.swaps.mark(vae, handle)
        return (f"{type(vae).__name__} decoder on kiln: {counts['conv']} convolutions, "
                f"{counts['resnet']} resnet blocks (GroupNorm + SiLU fused), "
                f"{counts['attention']} attention")

    def remove(self) -> None:
        self.swaps.undo()


# ---- entry point ---------------------------------------------------------------------------------


class Handle:
    """What kiln.diffusers.apply returns. remove() (idempotent) gives the model or pipeline its
    own forwards and weights back. summary: the line apply logged. graphs: the transformer's
    CUDA-graph runner (kiln.diffusers._graphs.GraphedForward) or None."""

    def __init__(self):
        self._patches = []
        self.summary = ""
        self.graphs = None

    def remove(self) -> None:
        while self._patches:
            self._patches.pop().remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self) -> str:
        state = "applied" if self._patches else "removed"
        return f"kiln.diffusers.Handle({state}: {self.summary})"


def _components(target):
    """(transformer, vae) of a pipeline or the one model given (the other None)."""
    from diffusers import DiffusionPipeline

    transformers = tuple(_transformer_classes())
    if isinstance(target, DiffusionPipeline):
        components = target.components
        transformer, vae = components.get("transformer"), components.get("vae")
        if transformer is None and vae is None:
            _refuse(f"{type(target).__name__} has no transformer and no vae component")
        if transformer is not None and not isinstance(transformer, transformers):
            _refuse(f"{type(target).__name__}.transformer is a {_qualname(transformer)}, "
                    "expected Flux2Transformer2DModel or FluxTransformer2DModel")
        if vae is not None and not isinstance(vae, _vae_classes()):
            _refuse(f"{type(target).__name__}.vae is a {_qualname(vae)}, expected "
                    "AutoencoderKLFlux2 or AutoencoderKL")
        return transformer, vae
    if isinstance(target, transformers):
        return target, None
    if isinstance(target, _vae_classes()):
        return None, target
    _refuse(f"got a {_qualname(target)}; kiln runs a diffusers pipeline, a "
            "Flux2Transformer2DModel or FluxTransformer2DModel, or their VAE "
            "(AutoencoderKLFlux2, AutoencoderKL)")


def apply(target, *, weights: str = "fp8", activations: str = "auto", graphs: bool = True,
          offload_replaced: bool = True) -> Handle:
    """See kiln.diffusers."""
    import diffusers

    if diffusers.__version__ != DIFFUSERS_VERSION:
        log.warning("kiln.diffusers mirrors diffusers %s, found %s: models whose structure "
                    "differs are refused", DIFFUSERS_VERSION, diffusers.__version__)
    transformer, vae = _components(target)
    patches = []
    if transformer is not None:
        classes = _transformer_classes()
        family = classes[next(c for c in classes if isinstance(transformer, c))]
        _check_transformer(transformer, family)
        device = _check_device(type(transformer).__name__, transformer)
        mode = _resolve_mode(weights, activations, device)
        patches.append(_TransformerPatch(transformer, family, mode, graphs, offload_replaced))
    else:
        _resolve_mode(weights, activations, torch.device("cpu"))
    if vae is not None:
        _check_vae(vae)
        _check_device(type(vae).__name__, vae)
        patches.append(_VaePatch(vae))
    handle = Handle()
    lines = []
    try:
        for patch in patches:
            lines.append(patch.install(handle))
            handle._patches.append(patch)
            if isinstance(patch, _TransformerPatch):
                handle.graphs = patch.runner
    except BaseException:
        patch.remove()
        handle.remove()
        raise
    handle.summary = "; ".join(lines)
    log.info("kiln.diffusers: %s", handle.summary)
    return handle
