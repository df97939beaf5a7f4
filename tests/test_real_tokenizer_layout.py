"""The real repositories ship T5's tokenizer as a sentencepiece `spiece.model` (no
tokenizer.json): loading it needs sentencepiece and protobuf. This builds that layout with a
small sentencepiece model and loads it through the predictors' own pipeline path."""

import json
import shutil

import pytest
import sentencepiece
import torch

from cogvideox_cog.generator import Request, VideoGenerator
from cogvideox_cog.media.mp4 import probe_mp4
from cogvideox_cog.pipeline import build_pipeline
from cogvideox_cog.variants import VARIANTS

CORPUS = [
    "a panda in a red jacket plays an acoustic guitar in a sunlit bamboo forest",
    "waves roll slowly onto a quiet beach at sunset while birds fly over the sea",
    "a small robot walks through a busy city street in the rain at night",
]


@pytest.fixture(scope="module")
def spiece_weights(tiny_weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("spiece")
    weights = root / "weights"
    shutil.copytree(tiny_weights["1.0-t2v"], weights)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 20))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(root / "spiece"),
        vocab_size=50,  # below the tiny text encoder's embedding rows
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
    )
    tokenizer = weights / "tokenizer"
    shutil.rmtree(tokenizer)
    tokenizer.mkdir()
    shutil.copy(root / "spiece.model", tokenizer / "spiece.model")
    config = {"tokenizer_class": "T5Tokenizer", "model_max_length": 226, "extra_ids": 0}
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(config))
    return weights


def test_a_sentencepiece_tokenizer_as_in_the_real_repos_loads_and_generates(spiece_weights):
    variant = VARIANTS["cogvideox-5b"]
    cpu = torch.device("cpu")
    generator = VideoGenerator(variant, build_pipeline(variant, spiece_weights, cpu, "none"), cpu)
    ids = generator.pipe.tokenizer("a panda plays guitar").input_ids
    assert ids[-1] == 1 and 2 not in ids  # ends with </s>, no unknown pieces
    video = generator.render_mp4(Request("a panda plays guitar", "", 9, 2, 6.0, None, None, seed=1))
    assert probe_mp4(video)["frames"] == 9
