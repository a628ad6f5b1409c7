"""Procedural drawing of one product view: silhouette, colour, pattern, details, background.

A garment is described in a unit frame (x right, y down, the garment inside [0, 1]^2) as filled shapes,
cut-outs (necklines) and thin details (seams, buttons, zips, pockets). A view places that frame in the image
(scale, centre, mirror) and the pattern is evaluated in the unit frame, so it moves and scales with the
garment. Drawing is numpy + PIL.ImageDraw only; one 256 px view takes about a millisecond.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from famevil_fast.data.synthetic.vocab import COLOURS

Point = tuple[float, float]


@dataclass(frozen=True)
class ProductSpec:
    """Everything visible (and the text-only material) of one product."""

    garment: str
    colour: str
    pattern: str
    second: str | None
    attrs: tuple[tuple[str, str], ...]
    material: str

    def attr(self, kind: str) -> str | None:
        return dict(self.attrs).get(kind)

    def visual_key(self) -> tuple:
        return (self.garment, self.colour, self.pattern, self.second, self.attrs)

    def replace(self, **changes: str | tuple[tuple[str, str], ...] | None) -> ProductSpec:
        values = {
            "garment": self.garment,
            "colour": self.colour,
            "pattern": self.pattern,
            "second": self.second,
            "attrs": self.attrs,
            "material": self.material,
        }
        values.update(changes)
        return ProductSpec(**values)


@dataclass(frozen=True)
class ViewSpec:
    """Placement of the garment frame in the image and the photographic conditions of one view."""

    scale: float  # garment frame side as a fraction of min(width, height)
    cx: float  # frame centre, fractions of width / height
    cy: float
    flip: bool
    back: bool  # back view: no neckline cut, no front details
    background: tuple[int, int, int]
    brightness: float


@dataclass
class Shapes:
    fill: list = field(
        default_factory=list
    )  # ("poly", pts) | ("ellipse", box) | ("line", pts, w) | ("arc", ...)
    cut: list = field(default_factory=list)  # ("poly", pts) | ("ellipse", box)
    details: list = field(default_factory=list)  # ("line", pts, w) | ("dot", centre, r) | ("rect", box, w)


def _mirror(points: list[Point]) -> list[Point]:
    return [(1.0 - x, y) for x, y in points]


def _sleeves(shapes: Shapes, sleeve: str | None, x_edge: float, top: float) -> None:
    if sleeve in (None, "sleeveless"):
        return
    if sleeve == "short":
        left = [(x_edge, top), (x_edge - 0.14, top + 0.12), (x_edge - 0.09, top + 0.22), (x_edge, top + 0.15)]
    else:
        left = [(x_edge, top), (x_edge - 0.17, top + 0.6), (x_edge - 0.09, top + 0.63), (x_edge, top + 0.17)]
    shapes.fill += [("poly", left), ("poly", _mirror(left))]


def _neckline(shapes: Shapes, neckline: str | None, top: float, back: bool) -> None:
    if neckline is None:
        return
    if neckline == "turtleneck":
        shapes.fill.append(
            ("poly", [(0.43, top - 0.08), (0.57, top - 0.08), (0.57, top + 0.02), (0.43, top + 0.02)])
        )
        shapes.details.append(("line", [(0.43, top + 0.02), (0.57, top + 0.02)], 0.012))
    elif back:
        shapes.cut.append(("ellipse", (0.44, top - 0.03, 0.56, top + 0.04)))
    elif neckline == "v-neck":
        shapes.cut.append(("poly", [(0.42, top - 0.01), (0.58, top - 0.01), (0.5, top + 0.17)]))
    else:
        shapes.cut.append(("ellipse", (0.42, top - 0.05, 0.58, top + 0.08)))


def _buttons(shapes: Shapes, xs: tuple[float, ...], y0: float, y1: float) -> None:
    for x in xs:
        for y in np.arange(y0, y1, 0.1):
            shapes.details.append(("dot", (x, float(y)), 0.012))


def _top_like(spec: ProductSpec, back: bool, half: float, hem: float) -> Shapes:
    s = Shapes()
    body = [
        (0.5 - half, 0.18),
        (0.42, 0.13),
        (0.58, 0.13),
        (0.5 + half, 0.18),
        (0.5 + half + 0.01, hem),
        (0.5 - half - 0.01, hem),
    ]
    s.fill.append(("poly", body))
    _sleeves(s, spec.attr("sleeve") or "long", 0.5 - half, 0.18)
    return s


def _tshirt(spec: ProductSpec, back: bool) -> Shapes:
    s = _top_like(spec, back, 0.2, 0.86)
    _neckline(s, spec.attr("neckline"), 0.13, back)
    return s


def _shirt(spec: ProductSpec, back: bool) -> Shapes:
    s = _top_like(spec, back, 0.2, 0.86)
    s.cut.append(("ellipse", (0.45, 0.1, 0.55, 0.16)))
    if back:
        s.details.append(("line", [(0.32, 0.28), (0.68, 0.28)], 0.01))
        return s
    s.details.append(("line", [(0.42, 0.13), (0.47, 0.22), (0.5, 0.15), (0.53, 0.22), (0.58, 0.13)], 0.012))
    s.details.append(("line", [(0.5, 0.2), (0.5, 0.86)], 0.008))
    _buttons(s, (0.525,), 0.27, 0.84)
    if spec.attr("pocket") == "chest pocket":
        s.details.append(("rect", (0.58, 0.3, 0.67, 0.41), 0.01))
    return s


def _top(spec: ProductSpec, back: bool) -> Shapes:
    s = Shapes()
    if spec.attr("sleeve") == "sleeveless":
        body = [
            (0.38, 0.22),
            (0.41, 0.12),
            (0.44, 0.12),
            (0.45, 0.18),
            (0.55, 0.18),
            (0.56, 0.12),
            (0.59, 0.12),
            (0.62, 0.22),
            (0.6, 0.45),
            (0.64, 0.76),
            (0.36, 0.76),
            (0.4, 0.45),
        ]
        s.fill.append(("poly", body))
        top = 0.19
    else:
        body = [
            (0.36, 0.2),
            (0.43, 0.14),
            (0.57, 0.14),
            (0.64, 0.2),
            (0.6, 0.45),
            (0.64, 0.76),
            (0.36, 0.76),
            (0.4, 0.45),
        ]
        s.fill.append(("poly", body))
        _sleeves(s, "short", 0.37, 0.2)
        top = 0.14
    _neckline(s, spec.attr("neckline"), top, back)
    return s


def _sweater(spec: ProductSpec, back: bool) -> Shapes:
    s = _top_like(spec, back, 0.22, 0.84)
    _neckline(s, spec.attr("neckline"), 0.13, back)
    s.details.append(("line", [(0.29, 0.79), (0.71, 0.79)], 0.012))
    for x_wrist in (0.2, 0.8):
        s.details.append(("line", [(x_wrist - 0.05, 0.73), (x_wrist + 0.03, 0.75)], 0.01))
    return s


_HEM = {"mini": 0.62, "knee": 0.78, "maxi": 0.95}


def _dress(spec: ProductSpec, back: bool) -> Shapes:
    s = Shapes()
    bodice = [(0.38, 0.17), (0.44, 0.12), (0.56, 0.12), (0.62, 0.17), (0.6, 0.42), (0.4, 0.42)]
    hem = _HEM[spec.attr("length") or "knee"]
    half = 0.12 + 0.3 * (hem - 0.42)
    s.fill += [("poly", bodice), ("poly", [(0.4, 0.42), (0.6, 0.42), (0.5 + half, hem), (0.5 - half, hem)])]
    _sleeves(s, spec.attr("sleeve"), 0.38, 0.17)
    _neckline(s, spec.attr("neckline"), 0.12, back)
    s.details.append(("line", [(0.4, 0.42), (0.6, 0.42)], 0.01))
    return s


def _skirt(spec: ProductSpec, back: bool) -> Shapes:
    s = Shapes()
    hem = {"mini": 0.5, "knee": 0.7, "maxi": 0.92}[spec.attr("length") or "knee"]
    flared = spec.attr("shape") == "flared"
    half = 0.2 + (0.35 if flared else 0.06) * (hem - 0.23)
    s.fill += [
        ("poly", [(0.36, 0.18), (0.64, 0.18), (0.64, 0.23), (0.36, 0.23)]),
        ("poly", [(0.36, 0.23), (0.64, 0.23), (0.5 + half, hem), (0.5 - half, hem)]),
    ]
    s.details.append(("line", [(0.36, 0.23), (0.64, 0.23)], 0.01))
    if flared and not back:
        for x in (0.42, 0.5, 0.58):
            s.details.append(("line", [(x, 0.26), (0.5 + (x - 0.5) * 2.2, hem - 0.02)], 0.006))
    return s


def _legs(s: Shapes, waist: float, crotch: float, hem: float, outer: float, inner: float) -> None:
    left = [(0.33, waist), (0.5, waist), (0.5, crotch), (0.5 - inner, hem), (0.5 - outer, hem)]
    s.fill += [("poly", left), ("poly", _mirror(left))]


def _trousers(spec: ProductSpec, back: bool) -> Shapes:
    s = Shapes()
    s.fill.append(("poly", [(0.33, 0.06), (0.67, 0.06), (0.67, 0.11), (0.33, 0.11)]))
    wide = spec.attr("fit") == "wide"
    _legs(s, 0.11, 0.34, 0.95, 0.22 if wide else 0.14, 0.01 if wide else 0.03)
    s.details.append(("line", [(0.33, 0.11), (0.67, 0.11)], 0.01))
    if not back:
        s.details.append(("line", [(0.5, 0.11), (0.5, 0.3)], 0.008))
    return s


def _shorts(spec: ProductSpec, back: bool) -> Shapes:
    s = Shapes()
    s.fill.append(("poly", [(0.32, 0.25), (0.68, 0.25), (0.68, 0.3), (0.32, 0.3)]))
    hem = 0.52 if spec.attr("leg") == "short" else 0.7
    _legs(s, 0.3, 0.45, hem, 0.2, 0.02)
    s.details.append(("line", [(0.32, 0.3), (0.68, 0.3)], 0.01))
    return s


def _outerwear(spec: ProductSpec, back: bool, hem: float, closure: str) -> Shapes:
    s = Shapes()
    s.fill.append(("poly", [(0.3, 0.15), (0.42, 0.1), (0.58, 0.1), (0.7, 0.15), (0.71, hem), (0.29, hem)]))
    _sleeves(s, "long", 0.3, 0.15)
    if back:
        s.cut.append(("ellipse", (0.45, 0.08, 0.55, 0.13)))
        return s
    if closure == "zip":
        s.cut.append(("ellipse", (0.45, 0.08, 0.55, 0.14)))
        s.details.append(("line", [(0.5, 0.13), (0.5, hem)], 0.014))
        s.details.append(("dot", (0.5, 0.2), 0.016))
    else:
        s.cut.append(("poly", [(0.44, 0.09), (0.56, 0.09), (0.5, 0.3)]))
        s.details.append(("line", [(0.42, 0.1), (0.47, 0.35), (0.5, 0.3)], 0.01))
        s.details.append(("line", [(0.58, 0.1), (0.53, 0.35), (0.5, 0.3)], 0.01))
        xs = (0.44, 0.56) if closure == "double-breasted" else (0.5,)
        _buttons(s, xs, 0.38, hem - 0.05)
    return s


def _coat(spec: ProductSpec, back: bool) -> Shapes:
    hem = 0.8 if spec.attr("length") == "knee" else 0.95
    return _outerwear(spec, back, hem, spec.attr("closure") or "single-breasted")


def _jacket(spec: ProductSpec, back: bool) -> Shapes:
    return _outerwear(spec, back, 0.64, spec.attr("closure") or "zip")


def _bag(spec: ProductSpec, back: bool) -> Shapes:
    s = Shapes()
    s.fill.append(
        ("poly", [(0.25, 0.42), (0.75, 0.42), (0.79, 0.5), (0.79, 0.84), (0.21, 0.84), (0.21, 0.5)])
    )
    if spec.attr("handle") == "top handle":
        s.fill.append(("arc", (0.35, 0.22, 0.65, 0.62), 180, 360, 0.045))
    else:
        s.fill.append(("line", [(0.27, 0.44), (0.5, 0.05), (0.73, 0.44)], 0.03))
    if not back:
        s.details.append(("line", [(0.21, 0.55), (0.5, 0.62), (0.79, 0.55)], 0.01))
        s.details.append(("dot", (0.5, 0.62), 0.018))
    return s


def _shoe(spec: ProductSpec, back: bool) -> Shapes:
    s = Shapes()
    if spec.attr("heel") == "high heel":
        s.fill.append(
            (
                "poly",
                [
                    (0.12, 0.78),
                    (0.15, 0.69),
                    (0.35, 0.63),
                    (0.55, 0.53),
                    (0.66, 0.4),
                    (0.8, 0.36),
                    (0.84, 0.56),
                    (0.2, 0.8),
                ],
            )
        )
        s.fill.append(("poly", [(0.76, 0.55), (0.84, 0.55), (0.82, 0.86), (0.79, 0.86)]))
        s.cut.append(("ellipse", (0.62, 0.33, 0.8, 0.45)))
        s.details.append(("line", [(0.12, 0.78), (0.5, 0.7), (0.8, 0.56)], 0.012))
    else:
        s.fill.append(
            (
                "poly",
                [
                    (0.12, 0.74),
                    (0.14, 0.63),
                    (0.3, 0.56),
                    (0.52, 0.52),
                    (0.6, 0.45),
                    (0.86, 0.44),
                    (0.88, 0.74),
                ],
            )
        )
        s.fill.append(("poly", [(0.11, 0.74), (0.89, 0.74), (0.89, 0.79), (0.11, 0.79)]))
        s.cut.append(("ellipse", (0.58, 0.41, 0.86, 0.5)))
        s.details.append(("line", [(0.11, 0.75), (0.89, 0.75)], 0.015))
    return s


def _hat(spec: ProductSpec, back: bool) -> Shapes:
    s = Shapes()
    s.fill.append(("poly", [(0.34, 0.56), (0.36, 0.3), (0.5, 0.25), (0.64, 0.3), (0.66, 0.56)]))
    brim = (0.24, 0.5, 0.76, 0.62) if spec.attr("brim") == "narrow brim" else (0.06, 0.47, 0.94, 0.65)
    s.fill.append(("ellipse", brim))
    s.details.append(("line", [(0.345, 0.5), (0.655, 0.5)], 0.03))
    return s


def _scarf(spec: ProductSpec, back: bool) -> Shapes:
    s = Shapes()
    s.fill.append(("poly", [(0.36, 0.08), (0.6, 0.08), (0.56, 0.88), (0.42, 0.88)]))
    s.fill.append(("poly", [(0.5, 0.18), (0.66, 0.2), (0.72, 0.8), (0.58, 0.82)]))
    s.details.append(("line", [(0.5, 0.18), (0.58, 0.82)], 0.008))
    if spec.attr("fringe") == "fringed":
        for x in np.linspace(0.43, 0.55, 6):
            s.fill.append(("line", [(float(x), 0.87), (float(x), 0.95)], 0.01))
        for x in np.linspace(0.59, 0.71, 6):
            s.fill.append(("line", [(float(x), 0.81), (float(x) + 0.01, 0.89)], 0.01))
    return s


_BUILDERS = {
    "t-shirt": _tshirt,
    "shirt": _shirt,
    "top": _top,
    "sweater": _sweater,
    "dress": _dress,
    "skirt": _skirt,
    "trousers": _trousers,
    "shorts": _shorts,
    "coat": _coat,
    "jacket": _jacket,
    "bag": _bag,
    "shoe": _shoe,
    "hat": _hat,
    "scarf": _scarf,
}


def garment_shapes(spec: ProductSpec, back: bool = False) -> Shapes:
    """The shapes of ``spec`` in the unit frame (front view unless ``back``)."""
    return _BUILDERS[spec.garment](spec, back)


class _Frame:
    """Maps unit-frame coordinates of a view to pixels."""

    def __init__(self, view: ViewSpec, width: int, height: int) -> None:
        self.side = view.scale * min(width, height)
        self.ox, self.oy = view.cx * width, view.cy * height
        self.flip = view.flip

    def xy(self, p: Point) -> tuple[float, float]:
        x, y = p
        if self.flip:
            x = 1.0 - x
        return (self.ox + (x - 0.5) * self.side, self.oy + (y - 0.5) * self.side)

    def box(self, b: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        x0, y0 = self.xy((b[0], b[1]))
        x1, y1 = self.xy((b[2], b[3]))
        return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))

    def width(self, w: float) -> int:
        return max(1, round(w * self.side))


def _draw_mask(shapes: Shapes, frame: _Frame, width: int, height: int) -> np.ndarray:
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    for item in shapes.fill:
        kind = item[0]
        if kind == "poly":
            draw.polygon([frame.xy(p) for p in item[1]], fill=255)
        elif kind == "ellipse":
            draw.ellipse(frame.box(item[1]), fill=255)
        elif kind == "line":
            draw.line([frame.xy(p) for p in item[1]], fill=255, width=frame.width(item[2]), joint="curve")
        elif kind == "arc":
            draw.arc(frame.box(item[1]), item[2], item[3], fill=255, width=frame.width(item[4]))
    for item in shapes.cut:
        if item[0] == "poly":
            draw.polygon([frame.xy(p) for p in item[1]], fill=0)
        else:
            draw.ellipse(frame.box(item[1]), fill=0)
    return np.asarray(mask) > 0


def _unit_coords(frame: _Frame, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    u = (np.arange(width, dtype=np.float32) + 0.5 - frame.ox) / frame.side + 0.5
    if frame.flip:
        u = 1.0 - u
    v = (np.arange(height, dtype=np.float32) + 0.5 - frame.oy) / frame.side + 0.5
    return u[None, :], v[:, None]


def pattern_mask(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where the second colour shows, for ``pattern`` at unit-frame coordinates u (1, W) and v (H, 1)."""
    shape = np.broadcast_shapes(u.shape, v.shape)
    if pattern == "plain":
        return np.zeros(shape, dtype=bool)
    if pattern == "stripes":
        return np.broadcast_to(np.floor(v * 11.0).astype(np.int64) % 2 == 1, shape)
    if pattern == "checks":
        return (np.floor(u * 8.0).astype(np.int64) % 2 == 1) ^ (np.floor(v * 8.0).astype(np.int64) % 2 == 1)
    if pattern == "dots":
        fu, fv = (u * 8.0) % 1.0 - 0.5, (v * 8.0) % 1.0 - 0.5
        return (fu * fu) + (fv * fv) < 0.08
    if pattern == "diagonal":
        return (
            np.floor(u * 9.0).astype(np.int64)
            + np.floor(v * 9.0).astype(np.int64)
            + ((u * 9.0) % 1.0 + (v * 9.0) % 1.0 >= 1.0)
        ) % 2 == 1
    if pattern == "colour-block":
        return np.broadcast_to(v > 0.5, shape)
    raise ValueError(f"unknown pattern {pattern!r}")


def _detail_colour(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    if lum > 90:
        return tuple(int(c * 0.55) for c in rgb)
    return tuple(int(c + (255 - c) * 0.45) for c in rgb)


_LEVELS = 64
_SHADE_LO, _SHADE_SPAN = 0.5, 0.56
_DETAIL = 3 * _LEVELS


@functools.lru_cache(maxsize=4096)
def _palette(colours: tuple, detail: tuple[int, int, int]) -> list[int]:
    """Palette of three colours x shade levels, then the detail tone; 8-bit P-mode entries."""
    factors = _SHADE_LO + _SHADE_SPAN * np.arange(_LEVELS) / (_LEVELS - 1)
    table = np.concatenate([np.outer(factors, np.asarray(c, dtype=np.float64)) for c in colours])
    table = np.concatenate([table, np.asarray([detail], dtype=np.float64)])
    return np.clip(table + 0.5, 0, 255).astype(np.uint8).ravel().tolist()


def _edges(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def render_view(spec: ProductSpec, view: ViewSpec, width: int, height: int) -> np.ndarray:
    """One view of ``spec`` as an (height, width, 3) uint8 array."""
    return np.asarray(render_image(spec, view, width, height).convert("RGB"))


def render_image(spec: ProductSpec, view: ViewSpec, width: int, height: int) -> Image.Image:
    """One view of ``spec`` as a palette ("P") PIL image of ``width`` x ``height`` (at most 193 colours)."""
    frame = _Frame(view, width, height)
    shapes = garment_shapes(spec, back=view.back)
    mask = _draw_mask(shapes, frame, width, height)
    u, v = _unit_coords(frame, width, height)

    alt = pattern_mask(spec.pattern, u, v)
    # shading in palette levels, separable: light from the top minus soft folds across
    top = 56.0 + (view.brightness - 1.0) * (_LEVELS - 1) / _SHADE_SPAN
    rows = np.clip(top + 4.0 - 9.0 * np.clip(v[:, 0], 0.0, 1.0), 28, _LEVELS - 1).astype(np.uint8)
    folds = np.rint(4.0 * np.cos(u[0] * 6.0) ** 2).astype(np.uint8)
    cloth = np.subtract.outer(rows + np.uint8(_LEVELS), folds)  # primary colour: palette slot 1
    np.add(cloth, np.uint8(_LEVELS), out=cloth, where=alt)  # second colour: slot 2
    backdrop = np.linspace(_LEVELS - 1, _LEVELS - 9, height).astype(np.uint8)[:, None]
    index = np.where(mask, cloth, backdrop)
    np.subtract(index, np.uint8(20), out=index, where=_edges(mask))
    img = Image.fromarray(index, "P")
    colours = (view.background, COLOURS[spec.colour], COLOURS[spec.second or spec.colour])
    img.putpalette(_palette(colours, _detail_colour(COLOURS[spec.colour])))

    if shapes.details:
        draw = ImageDraw.Draw(img)
        for item in shapes.details:
            if item[0] == "line":
                draw.line([frame.xy(p) for p in item[1]], fill=_DETAIL, width=frame.width(item[2]))
            elif item[0] == "dot":
                cx, cy = frame.xy(item[1])
                r = max(1.0, item[2] * frame.side)
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_DETAIL)
            elif item[0] == "rect":
                draw.rectangle(frame.box(item[1]), outline=_DETAIL, width=frame.width(item[2]))
    return img
