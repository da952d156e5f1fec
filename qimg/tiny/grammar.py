"""What the embedded tiny models can draw, in words: their world's grammar, example prompts, and whether a prompt
is one they understand (the CLI and the page warn when it is not)."""

from __future__ import annotations

from qimg.errors import InputError

EXAMPLES = {
    "generate": [
        "a large red circle in the center and a small blue square in the top left corner on a yellow background",
        "a small green triangle on the right on a white background, with the word \"OK\" in black at the bottom",
        "a large purple square at the top and a small orange circle in the bottom right corner on a black background",
    ],
    "edit": ["make the red circle green", "move the blue square to the bottom", "remove the green triangle",
             "add a small white circle in the top right corner", "change the background to yellow",
             "change the word to \"HI\""],
}


def grammar() -> str:
    """The world the embedded models were trained on, as a user needs to know it."""
    from qimg.tiny import world

    positions = ", ".join(world.POSITIONS.values())
    return (f"The embedded qimg-tiny models draw a small synthetic world on {world.CANVAS}x{world.CANVAS} "
            f"canvases:\n"
            f"- a plain background in one of: {', '.join(world.COLOURS)};\n"
            f"- 1-3 objects: {' / '.join(world.SHAPES)}, small or large, in one of the same colours, each in one "
            f"cell of a 3x3 grid: {positions};\n"
            f"- optionally a word of 2-3 capital letters in a colour and a cell (rarely legible).\n"
            f"Prompts read: a <size> <colour> <shape> <position> [and ...] on a <colour> background[, with the "
            f"word \"AB\" in <colour> <position>].\n"
            f"Edits: make the <colour> <shape> <colour>; move / remove the <colour> <shape>; add a <size> <colour> "
            f"<shape> <position>; change the background to <colour>; change the word to \"XY\".\n"
            f"Anything else is drawn anyway, badly: load a real checkpoint with --model for real pictures.")


def understands(prompt: str, editing: bool = False) -> bool:
    """Whether the embedded model's world can parse `prompt` (an edit instruction when `editing`)."""
    from qimg.tiny import world

    try:
        (world.parse_edit if editing else world.parse_prompt)(prompt)
    except (InputError, ValueError, KeyError, IndexError):
        return False
    return True
