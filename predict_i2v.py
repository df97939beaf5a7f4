"""CogVideoX image-to-video: the Cog inputs. The work happens in cogvideox_cog."""

from dataclasses import replace
from typing import Optional

from cog import BaseRunner, Input, Path, Secret

from cogvideox_cog.generator import Request
from cogvideox_cog.logs import setup_logging
from cogvideox_cog.media.fetch import fetched
from cogvideox_cog.parallel.gpus import start_generator


# The inputs are literal in each predictor: `cog build` reads each file on its own (an input
# registry must live in the same file), so the shared ones are written three times and
# tests/test_predictor_inputs.py fails when they differ.
class Predictor(BaseRunner):
    def setup(self) -> None:
        setup_logging()
        self.generator = start_generator("i2v")  # one GPU, or a rank per GPU

    def healthcheck(self) -> bool:
        return self.generator.healthcheck()

    def run(
        self,
        # A string, not a Path: Cog would download a Path with no size or time limit.
        image: str = Input(
            description="First frame of the video: an http(s) URL or a data: URI of a JPEG, "
            "PNG, WebP, HEIC, ... Scaled to cover the model's resolution and centre-cropped."
        ),
        prompt: str = Input(
            description="How the scene moves. May be empty.",
            max_length=10000,
            default="",
        ),
        enhance_prompt: bool = Input(
            description="First rewrite the prompt with a language model into the long, detailed "
            "description CogVideoX was trained on; the video is made from the rewrite, which is "
            "logged and returned as metrics.enhanced_prompt. Only on deployments that enable "
            "it.",
            default=False,
        ),
        enhance_prompt_api_key: Optional[Secret] = Input(
            description="Your key for the deployment's prompt-rewriting endpoint, where it asks "
            "for one: sent only to that endpoint, never logged. Empty: the deployment's own key.",
            default=None,
        ),
        negative_prompt: str = Input(
            description="What the video should not show.", max_length=10000, default=""
        ),
        num_frames: Optional[int] = Input(
            description="Frames to generate. CogVideoX 1.0: 8N+1 up to 49 (default 49); "
            "1.5: 16N+1 up to 161 (default 81). Empty: the model's default.",
            ge=9,
            le=161,
            default=None,
        ),
        num_inference_steps: int = Input(
            description="Denoising steps: more is slower and finer.", ge=1, le=500, default=50
        ),
        guidance_scale: float = Input(
            description="Classifier-free guidance: how closely to follow the prompt.",
            ge=1.0,
            le=20.0,
            default=6.0,
        ),
        use_dynamic_cfg: Optional[bool] = Input(
            description="Dynamic guidance as the model's authors run it: the scale swings "
            "between 1 and 1 + guidance_scale from step to step. Empty: the model's default "
            "(on for the 5B and 1.5 models, off for 2B).",
            default=None,
        ),
        fps: Optional[int] = Input(
            description="Frames per second of the mp4. Empty: the model's (8, or 16 for 1.5).",
            ge=1,
            le=60,
            default=None,
        ),
        seed: Optional[int] = Input(
            description="Random seed for a repeatable video. Empty: a random one (logged).",
            ge=0,
            le=4294967295,
            default=None,
        ),
        lora_url: Optional[str] = Input(
            description="A LoRA fine-tune of this model: an http(s) URL of a .safetensors "
            "file, hf://org/repo[/file.safetensors], or a tar of a training run's output. "
            "Cached by content. Empty: the base model.",
            default=None,
        ),
        lora_scale: float = Input(
            description="LoRA strength: 1.0 applies the file's alpha/rank, alpha = rank where "
            "it gives none, as upstream's cli_demo.py does (a SAT export wants 1/rank). 0 is the "
            "base model. Ignored without lora_url.",
            ge=-1.0,
            le=3.0,
            default=1.0,
        ),
        speed_mode: str = Input(
            description="default: the model as trained. fast: reuse attention between steps "
            "(Pyramid Attention Broadcast). faster: also reuse most negative-prompt passes "
            "(FasterCache). fast and faster trade some fidelity for speed (see the README).",
            choices=["default", "fast", "faster"],
            default="default",
        ),
        interpolate: str = Input(
            description="Smoother motion: RIFE adds 1 (2x) or 3 (4x) frames between each pair "
            "and raises the fps as much, so the motion spans the same time: 49 frames at 8 fps "
            "become 97 at 16 fps or 193 at 32 fps. Only where the deployment enables it.",
            choices=["none", "2x", "4x"],
            default="none",
        ),
        upscale: str = Input(
            description="Larger, sharper frames: Real-ESRGAN super-resolution to 2x or 4x the "
            "width and height (720x480 becomes 1440x960 or 2880x1920; the 1.5 models' 4x, "
            "5440x3072, is beyond what Firefox on Windows plays). Only where the deployment "
            "enables it.",
            choices=["none", "2x", "4x"],
            default="none",
        ),
        convert_colour: bool = Input(
            description="Convert the image from the colour profile it embeds (a phone's Display "
            "P3, a camera's Adobe RGB) to sRGB, as a browser shows it. Off: its numbers are read "
            "as sRGB, as the model's authors read them, so such a photo's colours come out "
            "duller. Pictures in sRGB or without a profile are the same either way.",
            default=False,
        ),
    ) -> Path:
        request = Request(
            prompt=prompt,
            enhance_prompt=enhance_prompt,
            enhance_prompt_api_key=enhance_prompt_api_key,
            negative_prompt=negative_prompt,
            num_frames=num_frames,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            use_dynamic_cfg=use_dynamic_cfg,
            fps=fps,
            seed=seed,
            lora_url=lora_url,
            lora_scale=lora_scale,
            speed_mode=speed_mode,
            interpolate=interpolate,
            upscale=upscale,
            convert_colour=convert_colour,
        )
        self.generator.check(request)  # before the image is fetched
        with fetched("image", image, "picture") as image_file:
            return Path(self.generator.predict(replace(request, image=image_file)))
