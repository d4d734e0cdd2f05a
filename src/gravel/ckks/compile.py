"""Canonical float graph -> CKKS program: the passes of the CKKS backend.

    segment          cut the graph at its activations; what lies between two cuts must be
                     linear (gemm, conv, avgpool, affine, reshape, flatten, transpose, pad, add
                     and sub of one source) and is multiplied out into one dense matrix and bias
    polynomials      each activation becomes a polynomial (exact where it is one; else fitted on
                     its calibrated input range, the degree chosen by the accuracy it costs)
    fold             leading coefficients and constants move into the next matrix, so that the
                     polynomial evaluated encrypted is monic with no constant term
    plan             depth, then 128-bit parameters for it (gravel.ckks.params), the packing of
                     one image and of a batch, and the rotation steps each needs

The accuracy cost of the polynomials is measured on the calibration data against the float
graph and reported in `CkksCompiled.report`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gravel.ckks.params import choose_params, max_depth
from gravel.ckks.polyfit import ActPoly, polynomial_for
from gravel.ckks.program import CkksProgram, Stage, batch_rotation_steps, choose_block, single_plan
from gravel.compiler.ir import Graph, Node, evaluate
from gravel.compiler.passes import Pass, run_passes
from gravel.errors import DepthError, ModelError

__all__ = ["CkksCompiled", "CkksOptions", "compile_ckks", "lower_graph", "plan_program"]

_LINEAR = ("gemm", "conv", "affine", "avgpool", "reshape", "transpose", "pad", "add", "sub", "concat")
_MAX_MATRIX = 1 << 25  # entries of one dense stage matrix (256 MB of float64)
_ROOT = "__ckks_region_input"


@dataclass(frozen=True)
class CkksOptions:
    """How to compile for CKKS. `degree` None: try 2, 3, 4 for non-polynomial activations and
    keep the lowest whose accuracy loss (or disagreement, without labels) is at most
    `max_loss`. `precision_bits`: bits after the binary point wanted at the output.
    `batch_size`: the batch the SIMD packing is planned for; `batch_block`: samples per feature
    in one block of slots (a group), None: the cheapest for `batch_size` by the cost model of
    `gravel.ckks.program.batch_cost`. Any batch runs, in groups of `batch_block`.
    `finetune_epochs`: where fitted polynomials cost more than `max_loss`, train the program's
    matrices that many epochs with the polynomials in place (gravel.ckks.finetune) on the
    labelled fine-tuning samples (the calibration samples where none are given)."""

    degree: int | None = None
    max_loss: float = 0.01
    precision_bits: int = 11
    batch_size: int = 1000
    batch_block: int | None = None
    finetune_epochs: int = 0


@dataclass
class CkksCompiled:
    program: CkksProgram
    polys: list[ActPoly]
    report: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _is_cut(node: Node) -> bool:
    return node.op in ("input", "act")


def _region(graph: Graph, exit_name: str) -> tuple[list[Node], str]:
    """The linear nodes computing `exit_name` from one cut tensor, and that tensor."""
    members: dict[str, Node] = {}
    roots: set[str] = set()
    stack = [exit_name]
    while stack:
        name = stack.pop()
        node = graph.node(name)
        if _is_cut(node):
            roots.add(name)
            continue
        if name in members:
            continue
        if node.op not in _LINEAR:
            hint = {
                "maxpool": "max is not a polynomial: use average pooling for CKKS, or the TFHE backend",
                "mul": "a product of two computed tensors is not linear; only x*x-like products of "
                       "one tensor (fused into an activation) are supported",
                "softmax": "only a final softmax can be dropped",
            }.get(node.op, "not supported by the CKKS backend")
            raise ModelError(f"{node.where}: {hint}")
        members[name] = node
        stack.extend(node.inputs)
    if len(roots) != 1:
        raise ModelError(
            f"node {exit_name!r} combines {sorted(roots)}: a linear block between activations "
            "must read one tensor (residual connections across activations are not in the CKKS "
            "backend yet)"
        )
    order = [n for n in graph.nodes if n.name in members]
    return order, roots.pop()


def _dense(graph: Graph, nodes: list[Node], root: str, exit_name: str) -> tuple[np.ndarray, np.ndarray]:
    """The region as y = W x + b over flattened tensors, by evaluating it on a basis."""
    in_shape = graph.shapes[root]
    out_shape = graph.shapes[exit_name]
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    if n_in * n_out > _MAX_MATRIX:
        raise ModelError(
            f"node {exit_name!r}: its linear block is a {n_out}x{n_in} matrix, larger than the "
            f"{_MAX_MATRIX} entries the CKKS backend multiplies out; use smaller layers"
        )
    sub_nodes = [Node(_ROOT, "input")]
    for n in nodes:
        sub_nodes.append(Node(n.name, n.op, tuple(_ROOT if i == root else i for i in n.inputs),
                              n.attrs, n.source))
    sub = Graph(sub_nodes, exit_name, tuple(in_shape), "region")
    sub.check()
    zero = np.asarray(evaluate(sub, np.zeros((1,) + tuple(in_shape)))).reshape(1, n_out)
    basis = np.eye(n_in).reshape((n_in,) + tuple(in_shape))
    cols = np.asarray(evaluate(sub, basis)).reshape(n_in, n_out) - zero
    return cols.T.copy(), zero[0].copy()


def _segments(graph: Graph) -> list[tuple[Node | None, Node | None]]:
    """(linear exit, activation) pairs in order; the chain check happens here."""
    chain: list[tuple[Node | None, Node | None]] = []
    prev = graph.input.name
    users = graph.consumers()
    for node in graph.nodes:
        if node.op != "act":
            continue
        src = node.inputs[0]
        chain.append((None if src == prev else graph.node(src), node))
        prev = node.name
    if graph.output != prev:
        chain.append((graph.node(graph.output), None))
    # every activation's value must feed only the next block
    for lin, act in chain:
        if act is not None and act.name != graph.output and not users[act.name]:
            raise ModelError(f"{act.where}: its value is not used")
    return chain


def _choose_poly(graph: Graph, act: Node, calib_values: np.ndarray, degree: int | None,
                 trial: Any) -> ActPoly:
    shape = graph.shapes[act.inputs[0]]
    if degree is not None:
        return polynomial_for(act, shape, calib_values, degree)
    first = polynomial_for(act, shape, calib_values, 2)
    if first.exact:
        return first
    best = None
    for d in (2, 3, 4):
        p = first if d == 2 else polynomial_for(act, shape, calib_values, d)
        loss = trial(p)
        if best is None or loss < best[0] - 1e-12:
            best = (loss, p)
        if loss <= 0:
            break
    return best[1]


def lower_graph(graph: Graph, calib: np.ndarray, labels: np.ndarray | None = None,
                options: CkksOptions = CkksOptions()) -> CkksCompiled:
    """A canonical graph (see gravel.compiler.passes.canonicalise) as a CKKS program, not yet
    planned (no parameters): segment, choose polynomials, multiply out, fold."""
    g = graph.copy()
    g.check()
    calib = np.asarray(calib, dtype=np.float64)
    values = evaluate(g, calib, keep=True)
    reference = np.asarray(values[g.output]).reshape(len(calib), -1)
    ref_pred = reference.argmax(1)
    chain = _segments(g)
    # raw stages: (W, b) of each linear block and the polynomial after it
    raw: list[tuple[np.ndarray | None, np.ndarray | None, ActPoly | None, str]] = []
    polys: list[ActPoly] = []
    state = {"polys": {}}

    def loss_of(stage_polys: dict[str, ActPoly]) -> float:
        out = _simulate_graph(g, calib, stage_polys).reshape(len(calib), -1).argmax(1)
        if labels is not None:
            return float((ref_pred == labels).mean() - (out == labels).mean()) - options.max_loss
        return float((out != ref_pred).mean()) - options.max_loss

    prev = g.input.name  # the tensor the next block must read: a chain, nothing skips ahead
    for lin, act in chain:
        w = b = None
        source = ""
        if lin is not None:
            nodes, root = _region(g, lin.name)
            if root != prev:
                raise ModelError(
                    f"node {lin.source or lin.name!r} reads {root!r}, not the activation just before "
                    f"it ({prev!r}): skip connections are not in the CKKS backend yet"
                )
            w, b = _dense(g, nodes, root, lin.name)
            source = ", ".join(dict.fromkeys(n.source or n.name for n in nodes))
        p = None
        if act is not None:
            p = _choose_poly(g, act, values[act.inputs[0]], options.degree,
                             lambda cand, a=act: loss_of({**state["polys"], a.name: cand}))
            state["polys"][act.name] = p
            polys.append(p)
            prev = act.name
        raw.append((w, b, p, source))
    program = _fold(tuple(g.input_shape), raw)
    sim = program.simulate(calib).reshape(len(calib), -1)
    pred = sim.argmax(1)
    report: dict[str, Any] = {
        "activations": [p.describe() for p in polys],
        "exact": all(p.exact for p in polys),
        "calib_samples": len(calib),
        "agreement_with_float": float((pred == ref_pred).mean()),
        "max_abs_error_vs_float": float(np.max(np.abs(sim - reference))),
        "max_abs_output": float(np.max(np.abs(sim))),
        # what the client decrypts (before its output affine): it sizes the integer bits
        "max_abs_decrypted": float(np.max(np.abs(sim - program.out_offset)) / max(abs(program.out_scale), 1e-300)),
        "depth": program.depth,
    }
    if labels is not None:
        report["accuracy_float"] = float((ref_pred == labels).mean())
        report["accuracy_polynomial"] = float((pred == labels).mean())
    notes = [p.describe() for p in polys if not p.exact]
    if notes:
        cost = (f"accuracy {100 * report['accuracy_float']:.1f} % -> "
                f"{100 * report['accuracy_polynomial']:.1f} %" if labels is not None else
                f"{100 * report['agreement_with_float']:.1f} % of predictions unchanged")
        notes.append(f"polynomial activations on {len(calib)} calibration samples: {cost}")
        loss = (report["accuracy_float"] - report["accuracy_polynomial"]) if labels is not None \
            else 1 - report["agreement_with_float"]
        if loss > 0.01:
            notes.append("the polynomials cost more than 1 point: fine-tune with them in place "
                         "(gravel compile --backend ckks --finetune EPOCHS), or use the TFHE backend")
    return CkksCompiled(program, polys, report, notes)


def _simulate_graph(g: Graph, calib: np.ndarray, polys: dict[str, ActPoly]) -> np.ndarray:
    """The float graph with some activations replaced by polynomials (to judge a fit)."""
    h = g.copy()
    for node in h.nodes:
        if node.name in polys:
            node.attrs = {"fn": "composite", "params": {"steps": _poly_steps(polys[node.name].coeffs)}}
    return np.asarray(evaluate(h, calib))


def _poly_steps(coeffs: tuple[float, ...]) -> list[dict[str, Any]]:
    """Composite steps computing sum c_i x^i (value 0 is x; each step appends one value)."""
    steps: list[dict[str, Any]] = [{"fn": "affine", "scale": 0.0, "shift": float(coeffs[0]), "args": [0]}]
    acc = 1  # index of the running sum
    for i, c in enumerate(coeffs[1:], start=1):
        if c == 0.0:
            continue
        steps.append({"fn": "pow", "params": {"exponent": float(i)}, "args": [0]})
        steps.append({"fn": "affine", "scale": float(c), "shift": 0.0, "args": [len(steps)]})
        steps.append({"fn": "add", "args": [acc, len(steps)]})
        acc = len(steps)
    if acc != len(steps):  # pragma: no cover - the running sum is always last
        steps.append({"fn": "affine", "scale": 1.0, "shift": 0.0, "args": [acc]})
    return steps


def _fold(input_shape: tuple[int, ...], raw: list[tuple[Any, Any, ActPoly | None, str]]) -> CkksProgram:
    """Move each polynomial's leading coefficient and constant into what follows it."""
    stages: list[Stage] = []
    scale, offset = 1.0, 0.0  # the pending affine y = scale * h + offset of the previous output
    for w, b, p, source in raw:
        if w is not None:
            b = b + w.sum(axis=1) * offset
            w = w * scale
            scale, offset = 1.0, 0.0
        elif (scale != 1.0 or offset != 0.0) and p is not None:
            # an activation straight after an activation: substitute the affine into it
            poly = np.polynomial.Polynomial(p.coeffs)(np.polynomial.Polynomial([offset, scale]))
            p = ActPoly(p.node, p.fn, tuple(poly.coef), p.exact, p.lo, p.hi, p.max_error)
            scale, offset = 1.0, 0.0
        poly = None
        if p is not None:
            c = np.asarray(p.coeffs, dtype=np.float64)
            if len(c) == 1:
                raise ModelError(f"activation {p.node}: a constant polynomial carries no information")
            lead, const = float(c[-1]), float(c[0])
            if len(c) > 2:
                poly = (0.0,) + tuple(float(v) for v in c[1:-1] / lead) + (1.0,)
            scale, offset = lead, const
        if w is None and poly is None:
            continue
        stages.append(Stage(w, b, poly, source))
    if not stages:
        raise ModelError("the model computes nothing but an affine map of its input; nothing to encrypt")
    return CkksProgram(input_shape, stages, scale, offset)


def plan_program(program: CkksProgram, options: CkksOptions, max_abs_output: float,
                 name: str = "model") -> CkksProgram:
    """Parameters for the program's depth and for decrypted values up to `max_abs_output`
    (with 4x headroom), and both packings' rotation steps."""
    depth = program.depth
    integer_bits = max(2, math.ceil(math.log2(max(max_abs_output, 1.0) + 1)) + 2)
    try:
        params = choose_params(depth, precision_bits=options.precision_bits, integer_bits=integer_bits)
    except DepthError as exc:
        best = max_depth(precision_bits=options.precision_bits, integer_bits=integer_bits)
        raise DepthError(
            f"model {name!r} needs multiplicative depth {depth} ({_depth_breakdown(program)}); the "
            f"deepest 128-bit-secure CKKS parameters allow {best} at {options.precision_bits} bits "
            f"of precision: use fewer layers or lower-degree activations ({exc})"
        ) from None
    slots = params.slots
    # complex packing of the batch input halves the first matrix's work (its weights multiply
    # two features per slot; one conjugation per output takes the real part); it needs the
    # first stage to be a matrix (an activation on the packed input would mix the two)
    program.batch_complex = program.stages[0].weight is not None and program.n_in > 1
    if options.batch_block is None:
        block = choose_block(program, slots, options.batch_size)
    else:
        block = min(1 << (max(1, min(options.batch_block, slots)) - 1).bit_length(), slots)
    plan = single_plan(program, slots)
    program.params = params
    program.block = block
    program.single_steps = plan.rotation_steps(slots)
    program.single_kind, program.single_period, program.single_shift = plan.kind, plan.period, plan.shift
    program.batch_steps = batch_rotation_steps(program, slots, program.block)
    program.output_slots = plan.output_slots
    return program


def _depth_breakdown(program: CkksProgram) -> str:
    return " + ".join(f"{st.depth}" for st in program.stages) + " per stage"


def compile_ckks(model: Any, calib_x: np.ndarray, calib_y: np.ndarray | None = None,
                 options: CkksOptions = CkksOptions(), name: str | None = None,
                 finetune_data: tuple[np.ndarray, np.ndarray] | None = None,
                 ) -> tuple[CkksCompiled, dict[str, Any]]:
    """Import, canonicalise, lower and plan a model (nn.Module, ONNX path, checkpoint, Graph)."""
    from gravel.compiler.passes import canonicalise
    from gravel.compiler.pipeline import import_model
    from gravel.compiler.quantize import conform_batch

    source, info = import_model(model, calib_x[:1])
    if name:
        info["name"] = name
    graph = canonicalise(source)
    calib = conform_batch(calib_x, graph.input_shape)
    state: dict[str, Any] = {}

    def _lower(g: Graph) -> Graph:
        state["c"] = lower_graph(g, calib, calib_y, options)
        return g

    def _finetune(g: Graph) -> Graph:
        c = state["c"]
        loss = (c.report["accuracy_float"] - c.report["accuracy_polynomial"]
                if "accuracy_float" in c.report else 1 - c.report["agreement_with_float"])
        if options.finetune_epochs < 1 or c.report["exact"] or loss <= options.max_loss:
            return g
        fx, fy = finetune_data if finetune_data is not None else (calib, calib_y)
        if fy is None:
            raise ModelError("fine-tuning needs labels: give the calibration labels or fine-tuning data")
        from gravel.ckks.finetune import finetune_program

        result = finetune_program(c.program, fx, fy, options.finetune_epochs)
        sim = c.program.simulate(calib)
        c.report["finetune"] = result
        c.report["max_abs_decrypted"] = float(np.max(np.abs(sim - c.program.out_offset))
                                              / max(abs(c.program.out_scale), 1e-300))
        if calib_y is not None:
            c.report["accuracy_polynomial"] = float((sim.argmax(1) == np.asarray(calib_y)).mean())
        c.notes.append(f"fine-tuned {result['epochs']} epochs with the polynomials in place on "
                       f"{result['samples']} samples: accuracy there {100 * result['accuracy_before']:.1f} % "
                       f"-> {100 * result['accuracy_after']:.1f} %")
        return g

    def _plan(g: Graph) -> Graph:
        c = state["c"]
        plan_program(c.program, options, c.report["max_abs_decrypted"], info.get("name", "model"))
        return g

    run_passes(graph, [Pass("lower to CKKS stages", _lower),
                       Pass("fine-tune with the polynomials in place", _finetune),
                       Pass("plan CKKS parameters and packing", _plan)],
               check=lambda g: None)
    compiled = state["c"]
    compiled.report["graph_notes"] = list(graph.notes)
    return compiled, info
