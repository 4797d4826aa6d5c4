"""Synthetic visual data for the demo: scenes of coloured shapes, written as real image files and LLaVA
records.

A scene holds one to three objects, each with its own colour, its own shape, a size and a place (one of
four quadrants). Stage-1 records caption the scene (a sentence in quadrant order, or a list of its objects in
a random order); stage-2 records ask several questions about it (colour, shape, count, position, yes/no), and
a few text-only records keep the text-only path exercised. Every question has one unambiguous one-word answer,
so held-out accuracy is exact match.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
PLACES = ("top left", "top right", "bottom left", "bottom right")
COUNTS = {1: "one", 2: "two", 3: "three"}
SIZES = ("small", "large")

#: question type → the answers it can have (for chance accuracy)
ANSWER_SETS = {
    "colour": list(COLOURS),
    "shape": list(SHAPES),
    "count": list(COUNTS.values()),
    "position": list(PLACES),
    "yes/no": ["yes", "no"],
}


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str
    place: str


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: tuple[int, int, int]


def random_scene(rng: random.Random) -> Scene:
    n = rng.choice((1, 2, 3))
    colours = rng.sample(list(COLOURS), n)
    shapes = rng.sample(list(SHAPES), n)
    places = rng.sample(list(PLACES), n)
    objs = tuple(Obj(c, s, rng.choice(SIZES), p) for c, s, p in zip(colours, shapes, places))
    grey = rng.randint(200, 250)
    return Scene(objs, (grey, grey, grey))


def render(scene: Scene, size: int, rng: random.Random) -> Image.Image:
    im = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(im)
    half = size // 2
    for o in scene.objects:
        row = 0 if o.place.startswith("top") else 1
        col = 0 if o.place.endswith("left") else 1
        extent = int(half * (0.8 if o.size == "large" else 0.5))
        cx = col * half + half // 2 + rng.randint(-1, 1)
        cy = row * half + half // 2 + rng.randint(-1, 1)
        box = (cx - extent // 2, cy - extent // 2, cx + extent // 2, cy + extent // 2)
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=fill)
    return im


def caption(scene: Scene) -> str:
    """The objects from the top left to the bottom right (one order: what a caption says is decided by the
    image alone)."""
    objects = sorted(scene.objects, key=lambda o: PLACES.index(o.place))
    parts = [f"a {o.size} {o.colour} {o.shape} at the {o.place}" for o in objects]
    if len(parts) == 1:
        return parts[0].capitalize() + "."
    return (", ".join(parts[:-1]) + " and " + parts[-1]).capitalize() + "."


def ask(kind: str, o: Obj, scene: Scene, rng: random.Random, decoys: tuple[str, ...] = ()) -> tuple[str, str, str]:
    """One (type, question, answer) about object ``o`` of ``scene``.

    A yes/no question is "yes" half the time; a "no" names a colour absent from the scene, or, when
    ``decoys`` (colours of other objects in the scene) are given, half the time one of those on ``o``'s
    shape: both are in the image, just not together, so only binding colour to shape answers it.
    """
    if kind == "colour":
        return kind, f"What colour is the {o.shape}?", o.colour
    if kind == "shape":
        return kind, f"What shape is the {o.colour} object?", o.shape
    if kind == "position":
        return kind, f"Where is the {o.colour} {o.shape}?", o.place
    if kind == "count":
        return kind, "How many shapes are there?", COUNTS[len(scene.objects)]
    if rng.random() < 0.5:
        return "yes/no", f"Is there a {o.colour} {o.shape}?", "yes"
    if decoys and rng.random() < 0.5:
        return "yes/no", f"Is there a {rng.choice(decoys)} {o.shape}?", "no"
    absent = [c for c in COLOURS if c not in {x.colour for x in scene.objects}]
    return "yes/no", f"Is there a {rng.choice(absent)} {o.shape}?", "no"


def questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """Held-out questions: one of each type, about one object of the scene."""
    o = rng.choice(scene.objects)
    return [ask(kind, o, scene, rng) for kind in ANSWER_SETS]


TRAINING_KINDS = ("colour", "colour", "shape", "position", "yes/no")


def conversation(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """Training questions for one multi-turn conversation, in a random order: the count, and one question
    about each object.

    One question per object, so that no turn gives away another turn's answer (asking the colour of the
    circle and then the shape of the red object lets a model answer from the text alone). Colour questions
    come twice as often as each other kind: they are the only ones that must find the object by its shape,
    which the tiny model learns last (measured). Some "no" questions pair a colour and a shape that are both
    in the image on different objects, so that existence questions also need colour bound to shape.
    """
    kinds = [rng.choice(TRAINING_KINDS) for _ in scene.objects]
    qs = [ask("count", scene.objects[0], scene, rng)]
    for o, kind in zip(scene.objects, kinds):
        # a decoy colour is never the answer of another turn
        decoys = tuple(x.colour for x, k in zip(scene.objects, kinds) if x is not o and k != "colour")
        qs.append(ask(kind, o, scene, rng, decoys))
    rng.shuffle(qs)
    return qs


STORIES = [
    ("What are the primary colours?", "red, yellow and blue."),
    ("How many sides does a square have?", "four."),
    ("How many sides does a triangle have?", "three."),
    ("Is a circle round?", "yes."),
    ("Name a shape with no corners.", "a circle."),
]


def _conv(*turns: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]


def write_dataset(root: str | Path, n_train: int, n_test: int, image_size: int, seed: int) -> dict:
    """Write images and the stage-1 (``captions.json``: captions, then object lists) / stage-2 / held-out record
    files under ``root``."""
    root = Path(root)
    rng = random.Random(seed)
    (root / "images" / "train").mkdir(parents=True, exist_ok=True)
    (root / "images" / "test").mkdir(parents=True, exist_ok=True)
    captions, instruct, heldout, scenes = [], [], [], {}
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            scene = random_scene(rng)
            ext = "png" if i % 3 == 0 else "jpg"
            rel = f"{split}/{i:05d}.{ext}"
            im = render(scene, image_size, rng)
            if ext == "jpg":
                im.save(root / "images" / rel, quality=95)
            else:
                im.save(root / "images" / rel)
            scenes[rel] = scene
            if split == "train":
                qs = conversation(scene, rng)
                captions.append({"id": f"cap-{i}", "image": rel,
                                 "conversations": _conv("<image>\nDescribe the image briefly.", caption(scene))})
                turns = [f"<image>\n{qs[0][1]}" if rng.random() < 0.5 else f"{qs[0][1]}\n<image>", qs[0][2]]
                for _, q, a in qs[1:]:
                    turns += [q, a]
                if i % 5 == 0:  # some conversations also ask for a description, as LLaVA's data does
                    turns += ["Describe the image briefly.", caption(scene)]
                instruct.append({"id": f"vqa-{i}", "image": rel, "conversations": _conv(*turns)})
                if i % 10 == 0:
                    q, a = STORIES[(i // 10) % len(STORIES)]
                    instruct.append({"id": f"txt-{i}", "conversations": _conv(q, a)})
            else:
                for k, (qtype, q, a) in enumerate(questions(scene, rng)):
                    heldout.append({"question_id": f"{i}-{k}", "image": rel, "type": qtype, "text": q,
                                    "answer": a})
    # a second kind of caption per training image, an object list (its own generator: the scenes, captions and
    # questions above do not depend on it)
    list_rng = random.Random(seed + 1)
    object_lists = [{"id": f"objects-{c['id'].split('-')[1]}", "image": c["image"],
                     "conversations": _conv("<image>\nList the objects.", object_list(scenes[c["image"]], list_rng))}
                    for c in captions]
    files = {"captions": root / "captions.json", "instruct": root / "instruct.json",
             "heldout": root / "heldout.jsonl", "images": root / "images"}
    files["captions"].write_text(json.dumps(captions + object_lists, indent=1))
    files["instruct"].write_text(json.dumps(instruct, indent=1))
    files["heldout"].write_text("".join(json.dumps(q) + "\n" for q in heldout))
    return {"files": {k: str(v) for k, v in files.items()}, "captions": captions, "object_lists": object_lists,
            "instruct": instruct,
            "scenes": scenes}


#: what the vision tower is pretrained to read in each quadrant: colour, shape, size (index 0 = empty),
#: and which quadrant it is looking at (patch features keep their place, as a real CLIP's do)
QUADRANT_ATTRIBUTES = (("", *COLOURS), ("", *SHAPES), ("", *SIZES), PLACES)


def quadrant_labels(scene: Scene) -> list[list[int]]:
    """For each quadrant (in ``PLACES`` order): [colour, shape, size, place] class indices."""
    out = []
    for q, place in enumerate(PLACES):
        o = next((x for x in scene.objects if x.place == place), None)
        values = (o.colour, o.shape, o.size) if o else ("", "", "")
        out.append([attrs.index(v) for attrs, v in zip(QUADRANT_ATTRIBUTES, values)] + [q])
    return out


def _word(place: str, o: Obj | None) -> str:
    what = f"{o.size}-{o.colour}-{o.shape}" if o else "empty"
    return f"[{place.replace(' ', '-')}:{what}]"


#: one word per quadrant and what is there: the compact notation of the descriptions the demo's language model
#: learns to read in place of an image (each word is one token of its tokenizer)
DESCRIPTION_WORDS = tuple(_word(p, o) for p in PLACES for o in
                          [None, *(Obj(c, s, z, p) for z in SIZES for c in COLOURS for s in SHAPES)])


def description_parts(word: str) -> tuple[str, ...]:
    """What a :data:`DESCRIPTION_WORDS` word is made of: its place, then size, colour and shape (or "empty")."""
    place, what = word[1:-1].split(":")
    return (place, *what.split("-"))


def describe(scene: Scene) -> list[str]:
    """What is in each quadrant (in ``PLACES`` order, the order of the vision tower's patches), one
    :data:`DESCRIPTION_WORDS` word each: the text the demo's language model learns to read in place of the
    image, as a real LLM reads a description."""
    by_place = {o.place: o for o in scene.objects}
    return [_word(p, by_place.get(p)) for p in PLACES]


def object_list(scene: Scene, rng: random.Random) -> str:
    """The scene's objects in a random order, each as two words: its colour then its shape, or its shape then
    its colour, at random ("circle red. blue square.").

    A second kind of caption (stage 1's data and the language model's texts): each second word is found by
    looking the first up in the image (or its description) — by colour or by shape, in an order the quadrants
    do not give away. A caption in quadrant order can be written by keeping one's place instead, and never
    asks to find an object by its shape; "What colour is the circle?" does (measured: without these lists the
    language model's pretraining did not teach it).
    """
    objects = list(scene.objects)
    rng.shuffle(objects)
    return " ".join(f"{o.colour} {o.shape}." if rng.random() < 0.5 else f"{o.shape} {o.colour}." for o in objects)


def named_objects(scene: Scene, text: str) -> int:
    """How many of the scene's objects ``text`` names by their colour and shape together ("red circle")."""
    words = " ".join(text.lower().replace(".", " ").replace(",", " ").split())
    return sum(f"{o.colour} {o.shape}" in words for o in scene.objects)


def chance_accuracy(heldout: list[dict]) -> float:
    """Expected exact-match accuracy of guessing uniformly among each question type's answers."""
    return sum(1.0 / len(ANSWER_SETS[q["type"]]) for q in heldout) / max(len(heldout), 1)
