"""What enhance_prompt adds to a prediction, on a CPU, side by side with the prediction itself.

1. The tiny text-to-video model (as the tests use), one prediction through
   `VideoGenerator.render_mp4`: without enhance_prompt, with the endpoint backend (a
   chat-completions server on 127.0.0.1, so the figure is our own overhead, not a provider's
   latency) and with the local backend on the tiny random Qwen2 (capped at 226 tokens).
2. The local model at its real size: Qwen2.5-1.5B-Instruct's architecture from its published
   config (28 layers, 1536 wide, 12 query and 2 key-value heads, MLP 8960, vocabulary
   151936, tied embeddings) with random weights, float32: the prompt pass over a chat of the
   instruction's length, then greedy tokens, timed with the same GenerationConfig as
   prompts/local.py. A 226-token rewrite is projected from the measured per-token time.

Usage: python3 benchmarks/enhance_prompt.py [--tokens 16] [--out DIR]
(default DIR: benchmarks/results/cpu/enhance-prompt)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import environment, fmt, markdown_table, write_json
from cogvideox_cog.devtools.tiny import save_tiny_weights
from cogvideox_cog.devtools.tiny_llm import save_tiny_causal_lm
from cogvideox_cog.generator import Request, VideoGenerator
from cogvideox_cog.pipeline import build_pipeline
from cogvideox_cog.prompts.endpoint import EndpointRewriter
from cogvideox_cog.prompts.enhance import PromptEnhancer
from cogvideox_cog.prompts.local import LocalRewriter
from cogvideox_cog.variants import VARIANTS
from tests.chat_server import ChatServer

CPU = torch.device("cpu")
PROMPT = "a cat playing piano"
# The instruction, its example and a short prompt, in Qwen2.5 tokens: about 2,100
# characters of English at about 4.3 characters a token.
CHAT_TOKENS = 500
CAP_TOKENS = 226  # the text encoder's length, the rewrite's cap
QWEN25_15B = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)


def tiny_predictions(folder: Path, repeats: int) -> dict:
    """Median seconds of one tiny prediction, plain and with each backend."""
    variant = VARIANTS["cogvideox-5b"]
    weights = save_tiny_weights(folder / "t2v", "1.0", "t2v")
    generator = VideoGenerator(variant, build_pipeline(variant, weights, CPU, "none"), CPU)
    fields = dict(prompt=PROMPT, negative_prompt="", num_frames=9, num_inference_steps=2)
    fields |= dict(guidance_scale=6.0, use_dynamic_cfg=None, fps=None, seed=1)
    llm = save_tiny_causal_lm(folder / "llm")
    with ChatServer() as chat:
        backends = {
            "none": None,
            "endpoint (loopback)": EndpointRewriter(chat.base_url, "bench", None, timeout=30),
            "local, tiny Qwen2": LocalRewriter.load(
                llm, "tiny", CPU, video_peak_gib=None, timeout=600
            ),
        }
        generator.render_mp4(Request(**fields))  # the first prediction pays one-off costs
        results = {}
        for name, rewriter in backends.items():
            generator.enhancer = PromptEnhancer(rewriter) if rewriter else None
            request = Request(**fields, enhance_prompt=rewriter is not None)
            results[name] = _median_seconds(lambda r=request: generator.render_mp4(r), repeats)
    return results


def _median_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def full_size_local_model(tokens: int) -> dict:
    """Prompt pass and per-token time of a Qwen2.5-1.5B-shaped model, projected to the cap."""
    config = Qwen2Config(**QWEN25_15B)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).eval()
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, config.vocab_size, (1, CHAT_TOKENS))
    eos = config.vocab_size + 1  # never produced: every run makes exactly its tokens

    def generate(new: int) -> float:
        greedy = GenerationConfig(
            do_sample=False, max_new_tokens=new, min_new_tokens=new, eos_token_id=eos
        )
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=greedy)
        return time.perf_counter() - started

    generate(1)  # warm-up
    first = generate(1)
    total = generate(tokens)
    per_token = (total - first) / (tokens - 1)
    return {
        "params": params,
        "chat_tokens": CHAT_TOKENS,
        "measured_tokens": tokens,
        "prompt_pass_s": first,
        "per_token_s": per_token,
        "projected_rewrite_s": first + per_token * (CAP_TOKENS - 1),
        "peak_rss_gib": psutil.Process().memory_info().rss / 2**30,
    }


def markdown(tiny: dict, full: dict) -> str:
    base = tiny["none"]
    rows = [
        [name, fmt(seconds), "" if name == "none" else f"+{fmt(seconds - base)}"]
        for name, seconds in tiny.items()
    ]
    lines = [
        "# enhance_prompt on a CPU",
        "",
        "Tiny text-to-video model, 9 frames, 2 steps: one prediction (median).",
        "",
        markdown_table(["enhance_prompt backend", "seconds", "added"], rows),
        "",
        f"Qwen2.5-1.5B-Instruct architecture, random weights, float32, {full['params'] / 1e9:.2f} "
        f"B parameters: a {full['chat_tokens']}-token chat.",
        "",
        markdown_table(
            ["prompt pass", "per token", f"{CAP_TOKENS}-token rewrite (projected)", "RSS"],
            [
                [
                    f"{fmt(full['prompt_pass_s'])} s",
                    f"{fmt(full['per_token_s'], 3)} s",
                    f"{fmt(full['projected_rewrite_s'], 1)} s",
                    f"{fmt(full['peak_rss_gib'], 1)} GiB",
                ]
            ],
        ),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16, help="greedy tokens to time at size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu/enhance-prompt"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        tiny = tiny_predictions(Path(folder), args.repeats)
    full = full_size_local_model(args.tokens)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"environment": environment(CPU), "tiny": tiny, "full_size": full}
    write_json(args.out / "enhance-prompt.json", record)
    (args.out / "results.md").write_text(markdown(tiny, full))
    print(markdown(tiny, full))
    return 0


if __name__ == "__main__":
    sys.exit(main())
