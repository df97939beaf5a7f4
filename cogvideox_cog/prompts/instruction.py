"""What the language model is asked: turn a short prompt into the kind of caption CogVideoX
was trained on.

CogVideoX learned from long, dense captions of whole clips: who or what is there and how it
looks, what happens from start to end, where, in what light, seen how. A short prompt leaves
all of that to chance. Upstream's demos ask an LLM to expand the prompt into such a
description, with examples; this instruction asks for the same, and adds what the model
cannot use (sound, dialogue, scene cuts, text about the video itself) and what must survive
the rewrite (everything the user said). For image-to-video the writer cannot see the image,
so it describes motion and camera rather than inventing how the first frame looks; for
video-to-video, the new look of a clip whose motion is kept.
"""

from __future__ import annotations

_INTRO = """\
You write prompts for CogVideoX, a model that turns one English paragraph into a short \
video clip of about six to ten seconds, filmed as one continuous shot. It was trained on \
long, concrete captions, and it follows them closely.

Rewrite the user's idea into such a caption. Rules:
- Keep every detail the user gave: subjects, their number, colours, names, style, setting, \
actions. Never contradict or drop one. Add only details that fit it.
"""

# What to be concrete about: all of it where the words alone make the video; only what the
# image (motion) or the clip (looks) leaves open, so no rule asks for what _TASK forbids.
_CONCRETE = {
    "t2v": """\
- Be concrete and visual: the main subject's appearance (shape, colour, material, \
clothing), what it does and how it moves over the clip, the surroundings, the time of day \
and the light, the mood, and how the camera frames and moves (close-up, wide shot, slow \
pan, tracking shot).
""",
    "i2v": """\
- Be concrete about motion: what each subject does and how it moves over the clip, what \
else in the scene moves, and how the camera moves (a slow push in, a gentle pan, or none).
""",
    "v2v": """\
- Be concrete about the look: the main subject's appearance (shape, colour, material, \
clothing), the surroundings, the time of day and the light, the mood and the style.
""",
}

_RULES = """\
- One paragraph of 80 to 150 words, in English, present tense, plain sentences.
- Describe only what can be seen: no sound, speech, music, smell, thoughts or story \
before or after the clip, no scene cuts, no on-screen text unless the user asks for it.
- If the idea is already a detailed description, keep it and only tidy it up.
- Answer with the caption alone: no title, no quotes, no list, no remark about the \
caption or the video.
"""

_TASK = {
    "t2v": "",
    "i2v": """\
This clip starts from an image the user supplies, which you cannot see. Describe how \
the scene moves and how the camera moves. Mention the subjects and the setting only as the \
user describes them; do not invent how they look.
""",
    "v2v": """\
This clip redraws an existing video, keeping its motion and framing. Describe what the \
new video shows and how it looks: subjects, materials, colours, light, style.
""",
}

_EXAMPLE_IDEA = "a cat playing piano"
_EXAMPLE_CAPTION = (
    "A fluffy ginger cat with white paws sits on a red velvet stool in front of a black "
    "grand piano in a warmly lit living room. Its front paws press the ivory keys one after "
    "another, and it leans forward, ears twitching, as it moves along the keyboard. Late "
    "afternoon sun falls through a tall window behind it, casting long golden stripes across "
    "the wooden floor and the polished lid of the piano. A potted fern and a stack of sheet "
    "music stand beside the piano. The camera starts in a close-up of the paws on the keys "
    "and slowly pulls back to a medium shot of the cat and the whole instrument, the room "
    "calm and cozy."
)


def instruction(task: str) -> str:
    """The system message for a predictor's task: "t2v", "i2v" or "v2v"."""
    return _INTRO + _CONCRETE[task] + _RULES + _TASK[task]


def messages(prompt: str, task: str) -> list[dict[str, str]]:
    """The chat to send: the instruction, a worked example, then the user's prompt.

    No example for image-to-video: it would teach the writer to describe how things look,
    which there the image decides.
    """
    chat = [{"role": "system", "content": instruction(task)}]
    if task != "i2v":
        chat += [
            {"role": "user", "content": _EXAMPLE_IDEA},
            {"role": "assistant", "content": _EXAMPLE_CAPTION},
        ]
    return [*chat, {"role": "user", "content": prompt.strip()}]
