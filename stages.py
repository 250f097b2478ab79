"""Every stage's training recipe, by paper: what is optimised, with which losses, and how it is shown.

    VQ-GAN, VQ-GAN-Seg   NÜWA (arXiv 2111.12417) §3.1; Esser et al., VQGAN (arXiv 2012.09841) §3.2
    NÜWA                 NÜWA §3.3-3.4: multi-task training of the 3D encoder-decoder, frozen tokenizers
    DF-VQGAN, MP-S2S     NÜWA-LIP (arXiv 2202.05009) §3.1, then §3.2-3.3 on the DF-VQGAN's frozen tokens
    Infinity             NÜWA-Infinity (arXiv 2207.09814): render-and-optimize, one unit per patch

A stage is a `Stage`: its config preset, a builder (with the frozen tokenizers it trains on), its
optimizers, its batch function (batches.py), its loss `Phase`s (one per optimizer: VQ-GAN has the
tokenizer's and the discriminator's), a picture of what it has learned, and the tokens a step trains
(for tokens/s). train.py runs any of them with the same loop, processes, checkpoints and logs;
`STAGES` names them for `--stage`. The losses of one micro-batch share a `Carry`: what an earlier
phase or unit leaves for a later one.

Sections: 1. phases, stages and what a step carries · 2. VQ-GAN and VQ-GAN-Seg · 3. NÜWA ·
4. DF-VQGAN and MP-S2S · 5. NÜWA-Infinity · 6. the stage table.

Glossary: b micro-batch, T frames, C channels, H W pixels, h w token grid, K codebook size,
x̂ reconstruction, sg[·] stop-gradient, D discriminator, E B G encoder, codebook, decoder.

Deviations from the papers (each marked at its line):
- NÜWA's V2V is scored on its predicted half only (`v2v_loss_on_given` restores the paper's loss).
- Pictures sample with top-k (runtime.TOP_K), as every reported figure.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

import batches
import data
import dfvqgan
import infinity
import lip
import nuwa
import runtime
import synthesis
import tasks
import vqgan

# ---------------------------------------------------------------------------------------------
# 1. Phases, stages, and what one micro-batch carries from phase to phase
# ---------------------------------------------------------------------------------------------


@dataclass
class Carry:
    """What the losses of one micro-batch hand on within a step: from one phase to the next (VQ-GAN's
    reconstruction for its discriminator), and from one unit to the next (Infinity's patches).
    train.py's `train_step` makes one per micro-batch and sets `unit`; the losses fill the rest."""

    unit: int = 0  # which forward/backward pass of the micro-batch this is (Infinity: the patch index)
    x_rec: torch.Tensor | None = None  # sg[x̂] of the tokenizer phase, D's fakes (b, C, H, W)
    tokens: torch.Tensor | None = None  # Infinity: the frozen tokenizer's tokens of the canvases (b, T, h, w)
    direction: str | None = None  # Infinity: the step's patch order's direction (ADC), drawn at unit 0
    order: list | None = None  # Infinity: the patches (t, i, j) in that order
    pool: Any = None  # Infinity: the Nearby Context Pool of the finished patches' states


def always(config: Any, step: int) -> bool:
    """A phase that runs at every step."""
    return True


def all_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(model.parameters())


def all_buffers(model: nn.Module) -> list[torch.Tensor]:
    """State the forward pass writes in place, by default: the buffers (BatchNorm statistics)."""
    return list(model.buffers())


def no_fsdp_units(model: nn.Module) -> list[nn.Module]:
    """No units of their own: FSDP shards the whole model as one."""
    return []


def one_unit(config: Any) -> int:
    return 1


def no_warmup(config: Any, step: int) -> float:
    return 1.0


def linear_warmup(config: Any, step: int) -> float:
    """The transformers' learning-rate factor: from 1 / warmup_steps up to 1 over the first steps."""
    return min(1.0, (step + 1) / max(1, config.warmup_steps))


@dataclass
class Phase:
    """One optimizer's part of a training step: its loss on every micro-batch, then clip and step.
    VQGAN has two (the tokenizer E, B, G, then the discriminator D); NÜWA has one."""

    name: str  # the optimizer's key in the stage's optimizers dict
    loss: Callable[..., dict[str, torch.Tensor]]  # (model, micro-batch, *, step, carry, autocast) → metrics
    parameters: Callable[[nn.Module], list] = all_parameters  # what this optimizer steps and clips
    objective: str = "loss"  # the metric that is backpropagated
    active: Callable[[Any, int], bool] = always  # (config, step) → does it run?


@dataclass
class Stage:
    """What differs between stages; the step, the loop, processes, checkpoints and logs are shared.
    A new stage fills in these fields and gets DDP, FSDP, accumulation, bf16, exact resume and
    checkpoints for free."""

    preset: Callable[[str], Any]  # preset name → the stage's config dataclass
    build: Callable[[Any, torch.device], nn.Module]  # (config, device) → model
    optimizers: Callable[[nn.Module, Any, torch.device], dict[str, torch.optim.Optimizer]]
    batch: Callable[[Any, int, int, int, int], Any]  # (config, seed, step, part, parts) → micro-batch (CPU)
    phases: list[Phase]
    visualise: Callable[[nn.Module, Any, Path], Path]  # (model, config, png path) → path written
    tokens_per_batch: Callable[[Any, int], int]  # (config, step) → tokens of the global batch, for tokens/s
    warmup: Callable[[Any, int], float] = no_warmup  # (config, step) → lr factor on top of the schedule
    fsdp_units: Callable[[nn.Module], list[nn.Module]] = no_fsdp_units  # sharded one by one
    units: Callable[[Any], int] = one_unit  # forward/backward passes per micro-batch (Infinity: patches)
    # Tensors the forward pass changes in place rather than the optimizer: kept whole (never sharded)
    # and broadcast from rank 0 after every step.
    in_place_state: Callable[[nn.Module], list[torch.Tensor]] = all_buffers
    # Config fields added after older checkpoints were written, with the values those were trained
    # with: --resume compares a checkpoint's config as if it had them.
    legacy_defaults: dict = field(default_factory=dict)
    # bf16 autocast also on a CPU with native bf16 matmuls: only for stages measured to learn as well
    # in it (RESULTS.md, training speed); the others train in float32 on any CPU.
    cpu_bf16: bool = False


# ---------------------------------------------------------------------------------------------
# 2. VQ-GAN and VQ-GAN-Seg (NÜWA §3.1; Esser et al. §3.2)
# ---------------------------------------------------------------------------------------------


def build_tokenizer(config: vqgan.VQGANConfig, device: torch.device) -> vqgan.VQGAN:
    return vqgan.VQGAN(config).to(device)


def seg_preset(name: str) -> vqgan.VQGANConfig:
    """VQ-GAN-Seg: the VQ-GAN preset on one-hot sketch maps (cross-entropy reconstruction)."""
    return vqgan.VQGANConfig.preset(name, seg=True)


def tokenizer_optimizers(model: vqgan.VQGAN, config: vqgan.VQGANConfig, device: torch.device) -> dict:
    """Two Adam optimizers: E/B/G ("vqgan") and the discriminator D ("disc")."""
    adam = dict(lr=config.lr, betas=config.betas, fused=device.type == "cuda")  # fused: one kernel, on GPUs
    optimizers = {"vqgan": torch.optim.Adam(model.tokenizer_parameters(), **adam)}
    if model.discriminator is not None:
        optimizers["disc"] = torch.optim.Adam(model.discriminator.parameters(), **adam)
    return optimizers


def tokenizer_loss(model: vqgan.VQGAN, x: torch.Tensor, *, step: int, carry: Carry, autocast) -> dict:
    """E, B, G: rec + codebook + commitment (+ λ·gan) on a micro-batch. The EMA codebook update
    happens inside this forward pass; with EMA the codes are not in the optimizer."""
    with autocast():
        x_rec, losses = model(x, step=step)  # x_rec (b, C, H, W)
    carry.x_rec = x_rec.detach()  # the discriminator's fakes: sg[x̂] of this same forward pass
    return losses


def discriminator_loss(model: vqgan.VQGAN, x: torch.Tensor, *, step: int, carry: Carry, autocast) -> dict:
    """D: hinge loss on x vs sg[x̂], from the same step on as the GAN term."""
    with autocast():
        return {"disc_loss": model.discriminator_loss(x, carry.x_rec)}


def tokenizer_parameters(model: vqgan.VQGAN) -> list[nn.Parameter]:
    return list(model.tokenizer_parameters())


def discriminator_parameters(model: vqgan.VQGAN) -> list[nn.Parameter]:
    return list(model.discriminator.parameters())


def discriminator_active(config: vqgan.VQGANConfig, step: int) -> bool:
    """D trains from disc_start on, as long as the GAN term is on (VQGAN §3.2's delayed start)."""
    return config.disc_weight > 0 and step >= config.disc_start


TOKENIZER_PHASES = [
    Phase("vqgan", tokenizer_loss, tokenizer_parameters),
    Phase("disc", discriminator_loss, discriminator_parameters, objective="disc_loss",
          active=discriminator_active),
]


def tokenizer_in_place_state(model: vqgan.VQGAN) -> list[torch.Tensor]:
    """The codebook is written by the EMA update, data-dependent init and dead-code restarts."""
    return list(model.quantizer.parameters()) + list(model.buffers())


def tokenizer_fsdp_units(model: vqgan.VQGAN) -> list[nn.Module]:
    """The encoder is one FSDP unit; decoder and D stay in the root unit, because the adaptive
    weight λ differentiates w.r.t. the decoder's last layer, through D, in the middle of the forward
    pass (autograd.grad): that layer must stay gathered, and D's backward hooks must not fire there."""
    return [model.encoder]


VISUAL_CLIPS = 4  # the pictures of DF-VQGAN and MP-S2S: 4 fixed held-out frames


def seeded_generator(device: torch.device) -> torch.Generator:
    """The pictures' sampling generator: seed 0, so that pictures of successive steps compare."""
    return torch.Generator(device=device).manual_seed(0)


def visualise_frames(model: vqgan.VQGAN, config: vqgan.VQGANConfig, path: Path) -> Path:
    return vqgan.reconstruction_grid(model, path)


def visualise_sketches(model: vqgan.VQGAN, config: vqgan.VQGANConfig, path: Path) -> Path:
    return vqgan.sketch_reconstruction_grid(model, path)


# ---------------------------------------------------------------------------------------------
# 3. NÜWA (§3.3-3.4): multi-task training of the 3D encoder-decoder on frozen tokenizers
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def frozen_tokenizer(path: str, device: str, codebook_size: int, token_shape: tuple[int, int]) -> vqgan.VQGAN:
    """A trained VQ-GAN / VQ-GAN-Seg, frozen: NÜWA is trained on its tokens (§3.1 then §3.3)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"tokenizer checkpoint {path} not found; train it first "
                                f"(python train.py --stage vqgan / --stage seg) or pass its path")
    model = vqgan.load_vqgan(path, map_location=device).to(device).eval().requires_grad_(False)
    if model.codebook_size != codebook_size or model.config.token_shape != token_shape:
        raise ValueError(f"{path} gives {model.codebook_size} codes on a {model.config.token_shape} grid, "
                         f"but the NÜWA config expects {codebook_size} codes on {token_shape}: set "
                         f"--codebook-size / --sketch-codebook-size / --token-h / --token-w to match")
    return model


def frozen_frame_tokenizer(config: nuwa.NUWAConfig, device: torch.device) -> vqgan.VQGAN:
    """The frozen frame VQ-GAN of a NÜWA config (`vqgan_ckpt`)."""
    token_shape = (config.token_h, config.token_w)
    return frozen_tokenizer(config.vqgan_ckpt, str(device), config.codebook_size, token_shape)


def build_nuwa(config: nuwa.NUWAConfig, device: torch.device) -> nuwa.NUWA:
    batches.nuwa_tasks(config)  # fail on a bad task list before any work
    model = nuwa.NUWA(config).to(device)
    if config.pixel_codes:  # what each code looks like, from the tokenizer NÜWA is trained on
        model.set_code_pixels(frozen_frame_tokenizer(config, device).code_patches())
    return model


TRANSFORMER_BETAS = (0.9, 0.95)  # AdamW's (β1, β2) for NÜWA, MP-S2S and Infinity (GPT-3's, as nanoGPT)


def nuwa_optimizers(model: nuwa.NUWA, config: nuwa.NUWAConfig, device: torch.device) -> dict:
    """AdamW with weight decay on matrices only (the usual transformer practice); fused on GPUs."""
    groups = nuwa.parameter_groups(model, config.weight_decay)
    adamw = torch.optim.AdamW(groups, lr=config.lr, betas=TRANSFORMER_BETAS, fused=device.type == "cuda")
    return {"nuwa": adamw}


def nuwa_condition(model: nuwa.NUWA, task: str, batch: dict) -> nuwa.Condition:
    """The encoder's input for a task: caption, sketch tokens, or "None" (video prediction)."""
    if task in ("t2i", "t2v", "t2v_start"):
        return nuwa.text_condition(model.vocabulary, batch["caption"])
    if task in ("s2i", "s2v"):
        config = model.config
        seg = frozen_tokenizer(config.seg_ckpt, str(model.bos.device), config.sketch_codebook_size,
                               (config.token_h, config.token_w))
        return nuwa.sketch_condition(seg.encode_sketch(batch["sketch"]))
    return nuwa.none_condition(model.vocabulary, batch["video"].shape[0])


def nuwa_loss(model: nuwa.NUWA, batch: dict, *, step: int, carry: Carry, autocast) -> dict:
    """NÜWA §3.4: L = Σ_tasks CE(next token), summed over the tasks of the mix (each a mean over
    its b·N scored target tokens, b·N/2 for V2V on its predicted half; equal micro-batches score
    equally many, so the micro-batch means decompose exactly)."""
    config = model.config
    frames = frozen_frame_tokenizer(config, model.bos.device)
    losses = {}
    for task, task_batch in batch.items():
        with torch.no_grad():
            targets = frames.encode_video(task_batch["video"])  # (b, T, h, w)
            cond = nuwa_condition(model, task, task_batch)
        loss_mask = None
        if task == "v2v" and not config.v2v_loss_on_given:
            # DEVIATION (NÜWA §3.4 sums the loss over every target token): the given half is always
            # given at test time, so only the predicted half is trained; the model's capacity and
            # gradient go to continuing motion instead of drawing frame 0 from nothing.
            loss_mask = torch.zeros_like(targets, dtype=torch.bool)  # (b, T, h, w)
            loss_mask[:, config.predict_frames // 2:] = True
        with autocast():
            losses[f"{task}_loss"] = model.loss(cond, targets, loss_mask)
    losses["loss"] = sum(losses.values())
    return losses


VISUAL_CAPTIONS = ["digit 3 is moving up then down", "digit 4 is moving left then right"]  # seen combinations


@torch.no_grad()
def visualise_nuwa(model: nuwa.NUWA, config: nuwa.NUWAConfig, path: Path) -> Path:
    """PNG (+ GIF): text→video for two captions, then 10 → 10 prediction of a held-out clip
    (the given frames are the tokenizer's reconstruction; the rest is sampled); text→image when
    the run trains no video task."""
    device = model.bos.device
    frames = frozen_frame_tokenizer(config, device)
    sampling = dict(temperature=1.0, top_k=runtime.TOP_K, generator=seeded_generator(device))
    rows, labels = [], []
    listed = config.tasks.split(",")  # "t2v" is not "t2v_start"
    with runtime.evaluating(model):
        if "t2v" in listed:
            tokens = tasks.text_to_video(model, VISUAL_CAPTIONS, config.frames, **sampling)
            rows += list(frames.decode_video(tokens).float().clamp(0, 1).cpu())
            labels += VISUAL_CAPTIONS
        if "v2v" in listed:
            video = data.MovingMNIST("test", num_frames=config.predict_frames, length=1)[0]["video"][None]
            given = config.predict_frames // 2
            tokens = tasks.predict_video(model, frames.encode_video(video.to(device))[:, :given],
                                         config.predict_frames, **sampling)
            rows += [video[0], frames.decode_video(tokens).float().clamp(0, 1).cpu()[0]]
            labels += ["real clip", f"first {given} frames given, rest predicted"]
        if "t2i" in listed and not rows:  # an image-only run (e.g. --tasks t2i): one frame per caption
            tokens = tasks.text_to_image(model, VISUAL_CAPTIONS, **sampling)
            rows += list(frames.decode_video(tokens).float().clamp(0, 1).cpu())
            labels += VISUAL_CAPTIONS
    if not rows:  # sketch-image tasks only: nothing here draws them (sample.py s2i does)
        return Path(path)
    data.save_gif(rows, Path(path).with_suffix(".gif"), captions=labels)
    return data.save_grid(rows, path, captions=labels, max_frames=config.predict_frames)


def transformer_blocks(model: nuwa.NUWA) -> list[nn.Module]:
    """NÜWA's FSDP units: every transformer block of the encoder and the decoder."""
    return [*model.encoder, *model.decoder]


# ---------------------------------------------------------------------------------------------
# 4. NÜWA-LIP: DF-VQGAN (§3.1), then MP-S2S on its frozen tokens (§3.2-3.3)
# ---------------------------------------------------------------------------------------------


def build_dfvqgan(config: dfvqgan.DFVQGANConfig, device: torch.device) -> dfvqgan.DFVQGAN:
    """A DF-VQGAN, optionally starting from a trained plain VQGAN (`init_vqgan`): same parameter names."""
    model = dfvqgan.DFVQGAN(config)
    if config.init_vqgan:
        plain = vqgan.load_vqgan(config.init_vqgan)
        try:
            model.load_state_dict(plain.state_dict())
        except RuntimeError as error:
            raise ValueError(f"--init-vqgan {config.init_vqgan} is a VQGAN of another shape than this "
                             f"DF-VQGAN (set the same --ch, --ch-mult, --codebook-size, ... or drop "
                             f"--init-vqgan): {error}") from error
    return model.to(device)


def dfvqgan_loss(model: dfvqgan.DFVQGAN, batch: dict, *, step: int, carry: Carry, autocast) -> dict:
    """E, B, G: rec + codebook + commitment (+ λ·gan), masked encoding, skips where gated."""
    with autocast():
        x_rec, losses = model(batch["x"], batch["mask"], use_skips=batch["use_skips"], step=step)
    carry.x_rec = x_rec.detach()
    return losses


def dfvqgan_disc_loss(model: dfvqgan.DFVQGAN, batch: dict, *, step: int, carry: Carry, autocast) -> dict:
    """D: hinge loss on the unmasked frames vs sg[x̂]: the VQ-GAN's discriminator loss."""
    return discriminator_loss(model, batch["x"], step=step, carry=carry, autocast=autocast)


DFVQGAN_PHASES = [
    Phase("vqgan", dfvqgan_loss, tokenizer_parameters),
    Phase("disc", dfvqgan_disc_loss, discriminator_parameters, objective="disc_loss",
          active=discriminator_active),
]


@torch.no_grad()
def visualise_dfvqgan(model: dfvqgan.DFVQGAN, config: dfvqgan.DFVQGANConfig, path: Path) -> Path:
    """PNG: per held-out frame, the frame, its masked version, and decode(encode(masked)) with and
    without skips."""
    clips = data.MovingMNIST("test", num_frames=1, num_digits=2, length=VISUAL_CLIPS)
    x = torch.stack([clips[i]["video"][0] for i in range(VISUAL_CLIPS)])  # (4, 1, 64, 64)
    mask = torch.stack([data.random_box_mask(lip.item_rng(0, 0, i))
                        for i in range(VISUAL_CLIPS)])  # (4, 1, 64, 64)
    device = next(model.parameters()).device
    with runtime.evaluating(model):
        masked = x.masked_fill(mask, 0.0).to(device)
        indices, skips = model.encode(masked, mask.to(device))
        with_skips = model.decode(indices, skips, mask.to(device)).float().clamp(0, 1).cpu()  # (4, 1, 64, 64)
        without = model.decode(indices).float().clamp(0, 1).cpu()
    shown = masked.cpu() + 0.5 * mask  # missing pixels grey
    rows = [torch.stack(r) for r in zip(x, shown, with_skips, without)]  # each (4, 1, 64, 64)
    legend = "frame | masked (grey = missing) | with skips | without skips"
    return data.save_grid(rows, path, captions=[legend] + [""] * (VISUAL_CLIPS - 1))


@functools.lru_cache(maxsize=2)
def frozen_dfvqgan(path: str, device: str) -> dfvqgan.DFVQGAN:
    """The trained DF-VQGAN, frozen: MP-S2S learns its tokens (LIP §3.1 then §3.2)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"DF-VQGAN checkpoint {path} not found; train it first "
                                f"(python train.py --stage dfvqgan) or pass --dfvqgan-ckpt")
    return dfvqgan.load_dfvqgan(path, map_location=device).requires_grad_(False)


def build_lip(config: lip.LIPConfig, device: torch.device) -> lip.MPS2S:
    model = lip.MPS2S(config).to(device)
    if not (config.pixel_codes or config.init_nuwa):
        return model
    tokenizer = frozen_dfvqgan(config.dfvqgan_ckpt, str(device))
    lip.check_pair(config, tokenizer.config)
    if config.pixel_codes:  # what each code looks like, drawn by the frozen DF-VQGAN's decoder
        model.set_code_pixels(tokenizer.code_patches())
    if config.init_nuwa:  # our option: the caption → frame path of a NÜWA trained on the same tokens
        source = nuwa.load_nuwa(config.init_nuwa, map_location=device)
        same_tokens = Path(source.config.vqgan_ckpt).resolve() == Path(tokenizer.config.init_vqgan).resolve()
        if not (tokenizer.config.freeze_tokens and same_tokens):
            raise ValueError(f"--init-nuwa needs the DF-VQGAN to give that NÜWA's tokens: train it with "
                             f"--init-vqgan {source.config.vqgan_ckpt} --freeze-tokens (this one: init_vqgan="
                             f"{tokenizer.config.init_vqgan!r}, "
                             f"freeze_tokens={tokenizer.config.freeze_tokens})")
        lip.init_from_nuwa(model, source)
    return model


def lip_optimizers(model: lip.MPS2S, config: lip.LIPConfig, device: torch.device) -> dict:
    """The same AdamW as NÜWA's (decay on matrices only), under the phase's name."""
    return {"lip": nuwa_optimizers(model, config, device)["nuwa"]}


def lip_loss(model: lip.MPS2S, batch: dict, *, step: int, carry: Carry, autocast) -> dict:
    """LIP §3.3: cross-entropy on the hole tokens of the frozen DF-VQGAN's tokens of the whole frame.
    The mean is over the micro-batch's hole tokens, whose number varies: with accumulation the step
    weighs micro-batches equally, not tokens (a mean of means; exact with one micro-batch)."""
    tokenizer = frozen_dfvqgan(model.config.dfvqgan_ckpt, str(model.bos.device))
    lip.check_pair(model.config, tokenizer.config)
    with torch.no_grad():
        tokens, _ = tokenizer.encode(batch["image"], batch["mask"])  # (b, h, w): the targets
        hole = lip.token_mask(batch["mask"], tokens.shape[-2:])  # (b, h, w)
    text = model.vocabulary.encode(batch["caption"]).to(tokens.device)  # (b, L)
    with autocast():
        loss = model.loss(text, tokens, hole, batch["image"], batch["mask"])
    return {"loss": loss, "hole_fraction": hole.float().mean()}


@torch.no_grad()
def visualise_lip(model: lip.MPS2S, config: lip.LIPConfig, path: Path) -> Path:
    """PNG: four held-out one-digit frames, half of each digit missing, inpainted under their captions."""
    tokenizer = frozen_dfvqgan(config.dfvqgan_ckpt, str(model.bos.device))
    clips = data.CaptionedMovingMNIST("heldout", num_frames=2, num_digits=1, length=VISUAL_CLIPS)
    items = [clips[i] for i in range(VISUAL_CLIPS)]
    image = torch.stack([item["video"][0] for item in items])  # (4, 1, 64, 64)
    mask = torch.stack([lip.half_digit_mask(frame, lip.SIDES[i % 4]) for i, frame in enumerate(image)])
    with runtime.evaluating(model):
        result, _ = lip.inpaint(model, tokenizer, image, mask, [item["caption"] for item in items],
                                top_k=runtime.TOP_K, generator=seeded_generator(model.bos.device))
    rows = [torch.stack(r) for r in zip(image, image.masked_fill(mask, 0.0) + 0.5 * mask, result.cpu())]
    return data.save_grid(rows, path, captions=[item["caption"] for item in items])


def lip_fsdp_units(model: lip.MPS2S) -> list[nn.Module]:
    """MP-S2S's FSDP units: every block of its three encoders and its decoder."""
    return [*model.text_encoder, *model.token_encoder, *model.pixel_encoder, *model.decoder]


# ---------------------------------------------------------------------------------------------
# 5. NÜWA-Infinity: render-and-optimize, one unit per patch
# ---------------------------------------------------------------------------------------------

def infinity_tokenizer(config: infinity.InfinityConfig, device: torch.device) -> vqgan.VQGAN:
    """The frozen frame VQ-GAN whose codes Infinity predicts; convolutional, so it tokenizes 64×W
    canvases too."""
    side = data.CANVAS // config.token_px  # tokens per 64 px
    return frozen_tokenizer(config.vqgan_ckpt, str(device), config.codebook_size, (side, side))


def build_infinity(config: infinity.InfinityConfig, device: torch.device) -> infinity.Infinity:
    infinity.training_directions(config)  # fail on a bad direction list before any work
    if Path(config.vqgan_ckpt).exists():  # a tokenizer of another f: say which flag fixes it
        f = vqgan.load_vqgan(config.vqgan_ckpt).config.downsample
        if f != config.token_px:
            raise ValueError(f"{config.vqgan_ckpt} has f = {f} px per token, but the Infinity config has "
                             f"token_px {config.token_px}: pass --token-px {f} (and a --patch-size that cuts "
                             f"{data.CANVAS // f}×{data.CANVAS // f} tokens), or the f = {config.token_px} "
                             f"tokenizer")
    model = infinity.Infinity(config).to(device)
    if config.pixel_codes:  # what each code of the frozen tokenizer looks like (pixel code embeddings)
        model.set_code_pixels(infinity_tokenizer(config, device).code_patches())
    return model


def infinity_loss(model: infinity.Infinity, batch: dict, *, step: int, carry: Carry, autocast) -> dict:
    """Unit u of a micro-batch is patch u of the step's order (§3.4): the loss of that patch given
    its pooled, detached context. Unit 0 tokenizes the canvases and opens the pool; both stay in
    `carry` for the later units, and each unit's backward frees its graph before the next patch."""
    if carry.unit == 0:
        with torch.no_grad():
            carry.tokens = infinity_tokenizer(model.config, model.bos.device).encode_video(batch["pixels"])
    with autocast():
        loss = infinity.unit_loss(model, carry.tokens, batch["caption"], unit=carry.unit, carry=carry,
                                  seed=batch["seed"], step=step)
    return {"loss": loss}


def infinity_optimizers(model: infinity.Infinity, config: infinity.InfinityConfig,
                        device: torch.device) -> dict:
    """The same AdamW as NÜWA's (decay on matrices only), under the phase's name."""
    return {"infinity": nuwa_optimizers(model, config, device)["nuwa"]}


@torch.no_grad()
def visualise_infinity(model: infinity.Infinity, config: infinity.InfinityConfig, path: Path) -> Path:
    """synthesis.visualise on a held-out example: a canvas of the test split, or for video configs a
    test clip twice as long as training's (with its caption when the model was trained on captions)."""
    tokenizer = infinity_tokenizer(config, model.bos.device)
    if config.data == "video":
        clip = data.MovingMNIST("test", num_frames=2 * config.frames, num_digits=config.video_digits,
                                length=1)[0]
        caption = batches.clip_caption(clip["digits"]) if config.video_captions else None
        return synthesis.visualise(model, tokenizer, path, real=clip["video"], caption=caption)
    real = batches.DigitCanvases("test", config.canvas_height, config.canvas_width, length=1)[0]["image"]
    return synthesis.visualise(model, tokenizer, path, real=real)  # real: (1, H, W)


def infinity_blocks(model: infinity.Infinity) -> list[nn.Module]:
    """Infinity's FSDP units: its transformer blocks."""
    return list(model.blocks)


# ---------------------------------------------------------------------------------------------
# 6. The stage table: `train.py --stage NAME`
# ---------------------------------------------------------------------------------------------

STAGES: dict[str, Stage] = {
    "vqgan": Stage(preset=vqgan.VQGANConfig.preset, build=build_tokenizer, optimizers=tokenizer_optimizers,
                   batch=batches.frame_batch, phases=TOKENIZER_PHASES, visualise=visualise_frames,
                   tokens_per_batch=batches.tokens_per_frame_batch, fsdp_units=tokenizer_fsdp_units,
                   in_place_state=tokenizer_in_place_state),
    "seg": Stage(preset=seg_preset, build=build_tokenizer, optimizers=tokenizer_optimizers,
                 batch=batches.sketch_batch, phases=TOKENIZER_PHASES, visualise=visualise_sketches,
                 tokens_per_batch=batches.tokens_per_frame_batch, fsdp_units=tokenizer_fsdp_units,
                 in_place_state=tokenizer_in_place_state),
    "nuwa": Stage(preset=nuwa.NUWAConfig.preset, build=build_nuwa, optimizers=nuwa_optimizers,
                  batch=batches.nuwa_batch, phases=[Phase("nuwa", nuwa_loss)], visualise=visualise_nuwa,
                  tokens_per_batch=batches.nuwa_tokens_per_batch, warmup=linear_warmup,
                  fsdp_units=transformer_blocks, legacy_defaults=nuwa.LEGACY_DEFAULTS, cpu_bf16=True),
    # NÜWA-LIP §3.1. No FSDP units: the masked passes call the encoder's layers, not encoder.forward.
    "dfvqgan": Stage(preset=dfvqgan.DFVQGANConfig.preset, build=build_dfvqgan,
                     optimizers=tokenizer_optimizers, batch=batches.dfvqgan_batch, phases=DFVQGAN_PHASES,
                     visualise=visualise_dfvqgan, tokens_per_batch=batches.tokens_per_frame_batch,
                     in_place_state=tokenizer_in_place_state),
    # NÜWA-LIP §3.2-3.3, on a frozen DF-VQGAN
    "lip": Stage(preset=lip.LIPConfig.preset, build=build_lip, optimizers=lip_optimizers,
                 batch=batches.lip_batch, phases=[Phase("lip", lip_loss)], visualise=visualise_lip,
                 tokens_per_batch=batches.lip_tokens_per_batch, warmup=linear_warmup,
                 fsdp_units=lip_fsdp_units, legacy_defaults=lip.LEGACY_DEFAULTS),
    "infinity": Stage(preset=infinity.InfinityConfig.preset, build=build_infinity,
                      optimizers=infinity_optimizers, batch=batches.infinity_batch,
                      phases=[Phase("infinity", infinity_loss)], visualise=visualise_infinity,
                      tokens_per_batch=batches.infinity_tokens_per_batch, warmup=linear_warmup,
                      fsdp_units=infinity_blocks, units=infinity.num_patches,
                      legacy_defaults=infinity.LEGACY_DEFAULTS),
}
