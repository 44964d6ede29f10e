"""The quantization spec: what bit widths and observers a model is quantized with.

A spec is a frozen dataclass. Its short form is the string users type (``w2a4``:
2-bit weights, 4-bit activations); its full form round-trips through JSON so that
manifests record exactly what was done.
"""

from __future__ import annotations

import dataclasses
import json
import re
from enum import Enum

from .errors import EdgeqError

MIN_BITS = 2
MAX_BITS = 8
_SHORT_FORM = re.compile(r"^w(\d+)a(\d+)$")
SPEC_FORM = f"wWaA with W and A between {MIN_BITS} and {MAX_BITS}, e.g. w2a4, w4a4, w8a8"
# A spec file (what --bits reads besides wWaA) states these fields of QuantSpec.to_dict(); "layers" is optional.
SPEC_FILE_FIELDS = (
    "weight_bits",
    "act_bits",
    "weight_observer",
    "act_observer",
    "first_last_bits",
    "weight_symmetric",
    "attention_bits",
)
SPEC_FILE_EXAMPLE = (
    '{"weight_bits": 2, "act_bits": 4, "weight_observer": "mse", "act_observer": "mse", "first_last_bits": 8, '
    '"weight_symmetric": true, "attention_bits": 8}'
)


def signed_range(bits: int) -> tuple[int, int]:
    """Integer levels of a signed symmetric quantizer (weights): -2^(b-1) .. 2^(b-1)-1."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def unsigned_range(bits: int) -> tuple[int, int]:
    """Integer levels of an unsigned quantizer with a zero point (activations): 0 .. 2^b-1."""
    return 0, 2**bits - 1


class Observer(str, Enum):
    """How a quantizer picks its range from calibration data."""

    MSE = "mse"  # the clipping range that minimizes the quantization error
    MINMAX = "minmax"  # the full observed range: no clipping, coarser steps

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """Bit widths and calibration choices for one quantized model.

    Weights are quantized per output channel, signed and symmetric around zero
    (integer levels -2^(b-1) .. 2^(b-1)-1, zero point 0), so integer kernels need
    no weight zero-point correction. Activations are quantized per tensor,
    unsigned with a zero point, which fits post-ReLU tensors and the u8*s8
    instructions of x86 (VNNI) alike.
    """

    weight_bits: int
    act_bits: int
    weight_observer: Observer = Observer.MSE
    act_observer: Observer = Observer.MSE
    # The first layer (it sees raw pixels) and the last (it makes the logits) lose the most
    # accuracy per bit and cost the least compute, so both keep 8-bit weights and inputs,
    # as in BRECQ and QDrop. None: every layer at weight_bits/act_bits.
    first_last_bits: int | None = 8
    # Weights symmetric around zero (zero point 0: the cheapest integer kernels), or
    # asymmetric with a per-channel zero point (all levels used on lopsided channels).
    weight_symmetric: bool = True
    # Both inputs of a product of two activations (a ViT's Q·Kᵀ and softmax·V): the softmax
    # output and the attention scores are the activations a ViT is most sensitive to, so
    # they keep 8 bits by default. None: act_bits.
    attention_bits: int | None = 8
    # Mixed precision: (layer name, weight bits, activation bits) for layers that differ from
    # the rule above (see edgeq.mixed, which chooses them). Empty: uniform.
    layers: tuple[tuple[str, int, int], ...] = ()

    def __post_init__(self):
        checks = [("weight", self.weight_bits), ("activation", self.act_bits)]
        if self.first_last_bits is not None:
            checks.append(("first/last layer", self.first_last_bits))
        if self.attention_bits is not None:
            checks.append(("attention", self.attention_bits))
        layers = []
        for entry in self.layers:
            if not (isinstance(entry, (tuple, list)) and len(entry) == 3 and isinstance(entry[0], str)):
                raise EdgeqError(
                    f"invalid layer entry {entry!r}", "expected [layer name, weight bits, activation bits]"
                )
            layers.append((entry[0], entry[1], entry[2]))
            checks += [(f"layer {entry[0]} weight", entry[1]), (f"layer {entry[0]} activation", entry[2])]
        object.__setattr__(self, "layers", tuple(sorted(layers)))
        for what, bits in checks:
            if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
                raise EdgeqError(f"invalid {what} bit width {bits!r}", f"expected {SPEC_FORM}")
        object.__setattr__(self, "weight_observer", _observer(self.weight_observer))
        object.__setattr__(self, "act_observer", _observer(self.act_observer))

    @classmethod
    def parse(cls, text: str) -> QuantSpec:
        """Parse the short form (``w2a4``); the observers take their defaults."""
        match = _SHORT_FORM.match(text.strip().lower()) if isinstance(text, str) else None
        if not match:
            raise EdgeqError(f"invalid bit spec '{text}'", f"expected {SPEC_FORM}")
        weight_bits, act_bits = int(match.group(1)), int(match.group(2))
        if not (MIN_BITS <= weight_bits <= MAX_BITS and MIN_BITS <= act_bits <= MAX_BITS):
            raise EdgeqError(f"invalid bit spec '{text}'", f"expected {SPEC_FORM}")
        return cls(weight_bits, act_bits)

    def __str__(self) -> str:
        if self.layers:  # mixed: the default bit widths and a digest of the per-layer choices
            import hashlib

            digest = hashlib.sha256(json.dumps(self.layers).encode()).hexdigest()[:6]
            return f"w{self.weight_bits}a{self.act_bits}-mixed-{digest}"
        return f"w{self.weight_bits}a{self.act_bits}"

    # Integer ranges. Weights are signed symmetric, activations unsigned.
    @property
    def weight_range(self) -> tuple[int, int]:
        return signed_range(self.weight_bits)

    @property
    def act_range(self) -> tuple[int, int]:
        return unsigned_range(self.act_bits)

    def to_dict(self) -> dict:
        return {
            "bits": str(self),
            "weight_bits": self.weight_bits,
            "act_bits": self.act_bits,
            "weight_observer": self.weight_observer.value,
            "act_observer": self.act_observer.value,
            "first_last_bits": self.first_last_bits,
            "weight_symmetric": self.weight_symmetric,
            "attention_bits": self.attention_bits,
        } | ({"layers": [list(entry) for entry in self.layers]} if self.layers else {})

    @classmethod
    def from_dict(cls, data: dict) -> QuantSpec:
        try:
            return cls(
                weight_bits=int(data["weight_bits"]),
                act_bits=int(data["act_bits"]),
                weight_observer=data.get("weight_observer", Observer.MSE),
                act_observer=data.get("act_observer", Observer.MSE),
                first_last_bits=data.get("first_last_bits", 8),
                weight_symmetric=bool(data.get("weight_symmetric", True)),
                attention_bits=data.get("attention_bits", 8),
                layers=tuple(tuple(entry) for entry in data.get("layers", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise EdgeqError(
                f"malformed quantization spec {data!r}: {exc}", "expected the fields of QuantSpec.to_dict()"
            ) from None

    def layer_bits(self, edge: bool, name: str | None = None) -> tuple[int, int]:
        """(weight bits, activation bits) of layer ``name``; ``edge``: the model's first or last layer."""
        for layer, weight_bits, act_bits in self.layers:
            if layer == name:
                return weight_bits, act_bits
        if edge and self.first_last_bits is not None:
            return max(self.weight_bits, self.first_last_bits), max(self.act_bits, self.first_last_bits)
        return self.weight_bits, self.act_bits

    @property
    def matmul_act_bits(self) -> int:
        """Bits of both inputs of an activation-by-activation matmul."""
        return self.act_bits if self.attention_bits is None else max(self.act_bits, self.attention_bits)

    @classmethod
    def load(cls, text: str) -> QuantSpec:
        """The short form (``w2a4``), or a JSON spec file with the fields of :meth:`to_dict`."""
        from pathlib import Path

        if isinstance(text, str) and text.lower().endswith(".json"):
            path = Path(text)
            if not path.is_file():
                raise EdgeqError(
                    f"spec file not found: {text}", "pass wWaA (e.g. w2a4) or a JSON file with the fields of a spec"
                )
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise EdgeqError(
                    f"spec file {text} is not valid JSON ({exc})", f"fix the file: {SPEC_FILE_EXAMPLE}"
                ) from None
            return cls.from_file_dict(data, text)
        return cls.parse(text)

    @classmethod
    def from_file_dict(cls, data, source: str = "spec file") -> QuantSpec:
        """A spec a user wrote: every field of :meth:`to_dict` stated, none null.

        Stricter than :meth:`from_dict` (which fills fields older manifests lack): a field left
        out or null in a file the user wrote is more likely a slip than a wish for the default,
        and a wrong guess quantizes the model at widths nobody asked for.
        """
        if not isinstance(data, dict):
            raise EdgeqError(f"{source} holds {type(data).__name__}, not a spec object", f"write {SPEC_FILE_EXAMPLE}")
        # "bits" is the short name to_dict() writes; "allocation" the record 'edgeq mixed' keeps of its choice
        unknown = sorted(set(data) - {*SPEC_FILE_FIELDS, "layers", "bits", "allocation"})
        if unknown:
            raise EdgeqError(
                f"{source} has unknown field(s) {', '.join(repr(f) for f in unknown)} (a misspelt field would be "
                "silently left at its default)",
                f"a spec file has the fields {', '.join(SPEC_FILE_FIELDS)}, and optionally layers",
            )
        for field in SPEC_FILE_FIELDS:
            if field not in data:
                raise EdgeqError(
                    f"{source} lacks the field '{field}'", f"a spec file states every field, e.g. {SPEC_FILE_EXAMPLE}"
                )
            if data[field] is None:
                hint = (
                    f"write a number: {field} is the least bits those layers keep, so {MIN_BITS} keeps them at the "
                    "spec's own widths"
                    if field in ("first_last_bits", "attention_bits")
                    else f"write its value, e.g. {SPEC_FILE_EXAMPLE}"
                )
                raise EdgeqError(f"{source}: field '{field}' is null", hint)
        if not isinstance(data["weight_symmetric"], bool):
            raise EdgeqError(
                f"{source}: field 'weight_symmetric' is {data['weight_symmetric']!r}", "write true or false"
            )
        for field in ("weight_bits", "act_bits", "first_last_bits", "attention_bits"):
            if not isinstance(data[field], int) or isinstance(data[field], bool):
                raise EdgeqError(
                    f"{source}: field '{field}' is {data[field]!r}",
                    f"write a whole number of bits, {MIN_BITS} to {MAX_BITS}",
                )
        layers = data.get("layers", [])
        if not isinstance(layers, list):
            raise EdgeqError(
                f"{source}: field 'layers' is {layers!r}",
                "write a list of [layer name, weight bits, activation bits], or leave it out",
            )
        return cls(
            weight_bits=data["weight_bits"],
            act_bits=data["act_bits"],
            weight_observer=data["weight_observer"],
            act_observer=data["act_observer"],
            first_last_bits=data["first_last_bits"],
            weight_symmetric=data["weight_symmetric"],
            attention_bits=data["attention_bits"],
            layers=tuple(layers),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> QuantSpec:
        return cls.from_dict(json.loads(text))


def _observer(value) -> Observer:
    try:
        return Observer(value)
    except ValueError:
        choices = ", ".join(o.value for o in Observer)
        raise EdgeqError(f"unknown observer '{value}'", f"choose one of: {choices}") from None


LAYER_BITS_FORM = "NAME=wWaA or NAME=N (N bits for both), comma-separated; NAME may hold * and ? (glob on module names)"
LAYER_BITS_EXAMPLE = "features.0=8,blocks.*.conv_dw=w4a4"


@dataclasses.dataclass(frozen=True)
class LayerOverride:
    """Bit widths for the quantizable layers whose module names match ``pattern`` (fnmatch: ``*`` spans dots)."""

    pattern: str
    weight_bits: int
    act_bits: int

    def __str__(self) -> str:
        return f"{self.pattern}=w{self.weight_bits}a{self.act_bits}"


def parse_layer_bits(text: str) -> tuple[LayerOverride, ...]:
    """``'features.0=8,blocks.*.conv_dw=w4a4'`` as overrides, in the order given (a later one wins)."""
    overrides = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        pattern, equals, bits = (piece.strip() for piece in item.partition("="))
        if not equals or not pattern:
            raise EdgeqError(
                f"invalid --layer-bits entry '{item}'", f"expected {LAYER_BITS_FORM}, e.g. {LAYER_BITS_EXAMPLE}"
            )
        if bits.isdigit():
            weight_bits = act_bits = int(bits)
        else:
            match = _SHORT_FORM.match(bits.lower())
            if not match:
                raise EdgeqError(f"invalid bits '{bits}' in --layer-bits entry '{item}'", f"expected {LAYER_BITS_FORM}")
            weight_bits, act_bits = int(match.group(1)), int(match.group(2))
        for bit_width in (weight_bits, act_bits):
            if not MIN_BITS <= bit_width <= MAX_BITS:
                raise EdgeqError(
                    f"invalid bits '{bits}' in --layer-bits entry '{item}'",
                    f"bit widths run from {MIN_BITS} to {MAX_BITS}",
                )
        overrides.append(LayerOverride(pattern, weight_bits, act_bits))
    if not overrides:
        raise EdgeqError("--layer-bits is empty", f"expected {LAYER_BITS_FORM}, e.g. {LAYER_BITS_EXAMPLE}")
    return tuple(overrides)


def apply_layer_bits(spec: QuantSpec, overrides, layer_names) -> QuantSpec:
    """``spec`` with each override's bit widths on every layer of ``layer_names`` its pattern matches.

    Overrides win over the spec's own per-layer entries and over first_last_bits; the result names layers
    one by one, so the manifest records exactly which layer got which widths. A pattern that matches no
    layer is an error naming the closest names (a typo would otherwise quantize the layer at the default).
    """
    import difflib
    from fnmatch import fnmatchcase

    if isinstance(overrides, str):
        overrides = parse_layer_bits(overrides)
    if not overrides:
        return spec
    names = list(layer_names)
    chosen = {name: (weight_bits, act_bits) for name, weight_bits, act_bits in spec.layers}
    for override in overrides:
        matched = [name for name in names if fnmatchcase(name, override.pattern)]
        if not matched:
            close = difflib.get_close_matches(override.pattern, names, n=4, cutoff=0.3) or names[:4]
            raise EdgeqError(
                f"--layer-bits pattern '{override.pattern}' matches no quantizable layer",
                f"close names: {', '.join(close)}",
            )
        for name in matched:
            chosen[name] = (override.weight_bits, override.act_bits)
    return dataclasses.replace(spec, layers=tuple((name, *bits) for name, bits in chosen.items()))
