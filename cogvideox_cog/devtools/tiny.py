"""Tiny random CogVideoX pipelines, saved in the layout of the real hub repositories.

Tests and the CPU demo load these with the same `from_pretrained` call, scheduler swap, VAE
tiling and generation code as the real weights, so only the sizes differ: a few MB on disk and
seconds per video on a laptop CPU. The weights are random (the video is noise), built from
configs shaped like upstream's, the way diffusers' own fast tests build theirs, and nothing is
fetched from the hub: the T5 tokenizer is assembled locally from a small fixed vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    CogVideoXDDIMScheduler,
    CogVideoXImageToVideoPipeline,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
)
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from ..variants import Size, Task

Family = Literal["1.0", "1.5"]

_VAE_SCALE = 8  # the real VAE's spatial compression (and 4 in time), so size rules hold
# 1.5 transformers are converted with sample_height = sample_width = 300 latents: a square
# upper bound for the sliced 3D rotary grid, not the training resolution (768 x 1360; some
# published configs hold that instead, which setup squares for 1.5-I2V). The tiny 1.5
# models keep the square shape: a bound that holds landscape and portrait sizes.
_MAX_LATENT_15 = 12
_LATENT_CHANNELS = 4  # the real VAE has 16; only the ratio to the transformer's input matters
_TEXT_DIM = 32  # T5 d_model, fed to the transformer's text_embed_dim (4096 for T5-XXL)
_TIME_DIM = 16  # time_embed_dim; the 1.5 I2V ofs embedding is added to it, so equal sizes


@dataclass(frozen=True)
class TinySpec:
    """What a test needs to know about a tiny model without loading it."""

    # Native pixel size (the real models: 480 x 720 for 1.0, 768 x 1360 for 1.5); not
    # square, to catch height/width swaps. For 1.0 it is also sample_height/width * 8 in the
    # transformer config; for 1.5, as upstream, the config holds only the square bound above.
    height: int
    width: int
    # The transformer's max_text_seq_length, 226 as in every real release.
    max_sequence_length: int


TINY: dict[tuple[Family, Task], TinySpec] = {
    ("1.0", "t2v"): TinySpec(height=48, width=80, max_sequence_length=226),
    ("1.0", "i2v"): TinySpec(height=48, width=80, max_sequence_length=226),
    ("1.5", "t2v"): TinySpec(height=48, width=80, max_sequence_length=226),
    ("1.5", "i2v"): TinySpec(height=48, width=80, max_sequence_length=226),
}

# Words of typical prompts, each one token; anything else is spelled out in characters.
_WORDS = """
a an the and or of in on at to from with by for over under into through across near
behind above below between while as is are it its his her their this that these those
one two three some many small large big tiny huge little old young new long short tall
red orange yellow green blue purple pink white black gray brown golden silver dark light
bright soft warm cold slow fast quiet loud calm gentle wild happy sad
man woman child boy girl person people dog cat bird horse fish panda bear lion tiger
fox rabbit deer wolf car boat ship train plane bike robot dragon butterfly
tree trees forest flower flowers grass field mountain mountains hill river lake sea ocean
beach wave waves sky cloud clouds sun moon star stars rain snow fire smoke water ice wind
city street road house building room window door table chair stool bed garden park
bridge tower castle village market kitchen
guitar piano drum music book cup ball hat jacket dress coat shirt shoes glasses
walks walking runs running plays playing sits sitting stands standing flies flying
swims swimming dances dancing jumps jumping looks looking holds holding moves moving
rides riding falls falling turns turning smiles smiling watching clapping along
morning evening night day sunset sunrise sunshine shadow shadows camera view close shot
scene video frame slowly quickly softly cinematic realistic detailed beautiful
wooden stone glass metal sunlit bamboo acoustic other together around toward
""".split()
_PIECES = ["ing", "ed", "es", "ly", "er", "est", "tion"]  # single letters are in _CHARS
_CHARS = [chr(c) for c in range(33, 127)]  # printable ASCII without the space


def _tokenizer(max_length: int) -> T5Tokenizer:
    """A T5 tokenizer (Unigram over "▁"-prefixed pieces, <pad>=0, </s>=1, <unk>=2) with a
    vocabulary of a few hundred entries, so no sentencepiece model has to be downloaded.

    Whole words score higher than their spelling, so Viterbi prefers them; every printable
    ASCII character is in the vocabulary, so only non-ASCII text becomes <unk>.
    """
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [(f"▁{word}", -5.0) for word in _WORDS]
    vocab += [(piece, -7.0) for piece in _PIECES]
    vocab += [(char, -10.0) for char in _CHARS]
    if len({piece for piece, _ in vocab}) != len(vocab):
        raise AssertionError("duplicate piece in the tiny T5 vocabulary")
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def _text_encoder(vocab_size: int) -> T5EncoderModel:
    """T5 v1.1 shaped (gated-GELU, untied embeddings, relative attention), but 2 x 32 wide."""
    config = T5Config(
        vocab_size=vocab_size,
        d_model=_TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def _vae(family: Family, size: Size) -> AutoencoderKLCogVideoX:
    """Four blocks (spatial 8) and temporal_compression_ratio 4, as the real VAE, 8 wide.

    sample_height/width only set the tiling thresholds (half of them, as upstream's
    480 x 720 gives 240 x 360 tiles). diffusers' tiled encode and decode reassemble the
    right size only when the tile's latent height is a multiple of 6 and its width a
    multiple of 5 (as 30 x 45 is): 48 x 40 pixel tiles are the smallest that do, and they
    make the tiny models tile at their native size just as the real ones do at theirs.
    """
    return AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=_LATENT_CHANNELS,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
        sample_height=96,
        sample_width=80,
        # The real ones' values, never 1.0, so a code path that forgets the config's scaling
        # factor changes the output.
        scaling_factor=1.15258426 if size == "2b" else 0.7,
        # Upstream's 1.5 conversion sets this; only the 1.5 I2V pipeline reads it.
        invert_scale_latents=family == "1.5",
    ).eval()


def _transformer(
    family: Family, task: Task, size: Size, spec: TinySpec, heads: int = 2
) -> CogVideoXTransformer3DModel:
    """CogVideoX-2b / -5b / -5b-I2V / 1.5-5B / 1.5-5B-I2V shaped: same flags, 2 layers, 32
    wide (16 per head: more heads, wider). 2B has no rotary embeddings: sine-cosine position
    embeddings are added to the patches instead.

    attention_head_dim 16 is the smallest the 3D rotary embedding splits evenly
    (t, h, w = 4, 6, 6 of 16, as 16, 24, 24 of 64).
    """
    if family == "1.0":
        # The training resolution; with learned position embeddings (I2V) the only one.
        sample = {"sample_height": spec.height // _VAE_SCALE}
        sample["sample_width"] = spec.width // _VAE_SCALE
        extra = {"sample_frames": 49, "patch_size_t": None, "patch_bias": True}
    else:
        sample = {"sample_height": _MAX_LATENT_15, "sample_width": _MAX_LATENT_15}
        extra = {"sample_frames": 81, "patch_size_t": 2, "patch_bias": False}
        if task == "i2v":
            extra["ofs_embed_dim"] = _TIME_DIM
    return CogVideoXTransformer3DModel(
        num_attention_heads=heads,
        attention_head_dim=16,
        # I2V concatenates the first frame's latents on the channel axis.
        in_channels=_LATENT_CHANNELS * (2 if task == "i2v" else 1),
        out_channels=_LATENT_CHANNELS,
        time_embed_dim=_TIME_DIM,
        text_embed_dim=_TEXT_DIM,
        num_layers=2,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=spec.max_sequence_length,
        use_rotary_positional_embeddings=size == "5b",
        use_learned_positional_embeddings=family == "1.0" and task == "i2v",
        **sample,
        **extra,
    ).eval()


def _scheduler(size: Size) -> CogVideoXDDIMScheduler:
    """The CogVideoX-2b or -5b scheduler config (v-prediction, zero-SNR, trailing spacing;
    2B's shifts the SNR by 3). DDIM for every size, as upstream's weight conversion saves it
    (tools/convert_weight_sat2hf.py): the DPM the 5B and 1.5 models run comes only from the
    pipeline's scheduler swap, so a test sees that swap go missing."""
    return CogVideoXDDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        snr_shift_scale=3.0 if size == "2b" else 1.0,
        timestep_spacing="trailing",
    )


def build_tiny_pipeline(
    family: Family, task: Task, seed: int = 0, heads: int = 2, size: Size = "5b"
) -> CogVideoXPipeline | CogVideoXImageToVideoPipeline:
    """A float32 tiny random pipeline of the given release family ("1.0" or "1.5") and task.

    heads: the transformer's attention heads (sequence parallelism over N ranks needs N).
    size: "2b" for CogVideoX-2b's shape (1.0 text-to-video only).

    The same seed gives the same weights, byte for byte, whatever the global RNG state was
    (it is left untouched), so a saved tiny model is reproducible.
    """
    if (family, task) not in TINY:
        raise ValueError(f"no tiny CogVideoX for family={family!r}, task={task!r}")
    if size == "2b" and (family, task) != ("1.0", "t2v"):
        raise ValueError("CogVideoX-2b is a 1.0 text-to-video model only")
    spec = TINY[(family, task)]
    tokenizer = _tokenizer(spec.max_sequence_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _text_encoder(len(tokenizer))
        vae = _vae(family, size)
        transformer = _transformer(family, task, size, spec, heads)
    pipeline_class = CogVideoXPipeline if task == "t2v" else CogVideoXImageToVideoPipeline
    return pipeline_class(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=_scheduler(size),
    )


def save_tiny_weights(
    dest_dir: str | Path,
    family: Family,
    task: Task,
    seed: int = 0,
    heads: int = 2,
    size: Size = "5b",
) -> Path:
    """Write a tiny pipeline as the hub repos are laid out (model_index.json, transformer/,
    vae/, text_encoder/, tokenizer/, scheduler/; safetensors) and return the directory."""
    dest = Path(dest_dir)
    pipeline = build_tiny_pipeline(family, task, seed, heads, size)
    pipeline.save_pretrained(dest, safe_serialization=True)
    return dest
