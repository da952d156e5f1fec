"""The procedurally generated world the tiny qimg models are trained on.

Public contract (prompts, edits and renders depend on it; do not change lightly):

* Canvas 128x128, a plain background in one of eight palette colours.
* 1-3 objects: a shape (circle, square, triangle), a size (small ~22 px, large
  ~40 px on the longest side), a colour (never the background colour), centred
  in one of the nine cells of a 3x3 grid, at most one object per cell.
* Optionally a word of 2-3 uppercase letters, DejaVu Sans Bold, capitals 20 px
  tall, in one colour (not the background colour), centred in a free cell.
  Letters are laid out on their ink boxes with a fixed 3 px gap and squeezed
  horizontally when the word would be wider than 40 px, so a word always fits
  its cell and never touches a neighbour.
* Canonical prompt::

    a large red circle in the center and a small blue square in the top left
    corner on a yellow background, with the word "OK" in white at the bottom

* Canonical edits: ``make the {colour} {shape} {colour2}``, ``move the {colour}
  {shape} {position}``, ``remove the {colour} {shape}``, ``add a {size}
  {colour} {shape} {position}``, ``change the background to {colour}``,
  ``change the word to "{WORD}"``.
* Layers: background (opaque), then each object in scene order, then the word;
  compositing them with "over" gives exactly the rendered image.

Rendering is 4x4 supersampled (analytic shapes, FreeType glyphs) and cached per
(shape, size, cell) / (word, cell), so a scene renders in well under 1 ms.

Modules: `scene` (vocabulary, scenes, validation), `drawing` (pictures and layers), `language` (prompts,
parsing, the held-out split), `edits` (instructions, applying them, training batches).
"""

from qimg.tiny.world.edits import (  # noqa: F401
    apply_edit, batch, edit_instruction, edit_possible, find_object, paraphrase_edit, parse_edit, random_edit,
    random_edit_spec, valid_edits,
)
from qimg.tiny.world.language import (  # noqa: F401
    POSITION_PHRASES, PREFIXES, PREPOSITIONS, SHAPE_WORDS, SIZE_WORDS, held_out, is_held_out, join_phrases,
    object_phrase, paraphrase, parse_position, parse_prompt, prompt, random_train_scene, word_clause,
)
from qimg.tiny.world.drawing import (  # noqa: F401
    cell_box, cell_centre, composite, composite_array, glyph_mask, layer_arrays, render, render_array,
    render_layers, shape_alpha, word_alpha, word_mask_4x,
)
from qimg.tiny.world.scene import (  # noqa: F401
    ALL_COLOURS, CANVAS, CAP_PX, CELL, COLOURS, EDIT_KINDS, EXTRA_COLOURS, FONT_PATH, HELD_OUT_PERCENT, LETTERS,
    POSITIONS, SHAPES, SIZES, SS, WORD_GAP_PX, WORD_MAX_W_PX, Edit, Obj, Scene, Word, random_scene, random_word,
    validate,
)
