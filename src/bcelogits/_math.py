r"""The stable formulas, written once against an array namespace ``xp`` (``torch`` or ``numpy``).

Notation: ``x`` logit, ``y`` target, ``w`` weight, ``p`` pos_weight (all already broadcast-compatible
and in the compute dtype). The loss of one element is

.. math::

    \ell = w\,[(1-y)\,\mathrm{softplus}(x) + p\,y\,\mathrm{softplus}(-x)],\qquad
    \partial\ell/\partial x = w\,[(1-y)\,\sigma(x) - p\,y\,\sigma(-x)],\qquad
    \partial\ell/\partial y = w\,[p\,\mathrm{softplus}(-x) - \mathrm{softplus}(x)].

Both loss terms are non-negative, so their sum never cancels. Everything is evaluated from
``a = |x|`` and ``h = exp(-a/2)``, ``e = h*h = exp(-a)``: on the side of ``x`` the element leans to
(the "big" side) ``softplus = a + log1p(e)`` and ``sigma = 1/(1+e)``; on the other ("small") side
``softplus = log1p(e)`` and ``sigma = e/(1+e)``. A small-side value is multiplied by its coefficient
*before* the second factor ``h`` is applied, so ``p * w * exp(-a)`` stays a normal number whenever the
true product is one, even where ``exp(-a)`` alone would underflow (float32, ``|x| > 87``). Limits at
``x = +-inf`` are exact: a zero coefficient times an infinite softplus is 0, never NaN.

The kernels in :mod:`bcelogits.kernels` implement this same algorithm in one pass; these functions are
the reference they are tested against, the plain (unfused) path, and, written in ``torch`` ops, the
differentiable formulas used by double backward.
"""

from __future__ import annotations

# Beyond this |x| the small-side softplus log1p(e) equals e to the last bit in float64 (e < 2**-57),
# so it is evaluated as (c*h)*h, which cannot underflow early.
SMALL_SIDE_LINEAR = 40.0


def smooth_target(y, label_smoothing: float):
    """Label smoothing toward 1/2: ``y * (1 - eps) + eps / 2``."""
    if not label_smoothing:
        return y
    return y * (1.0 - label_smoothing) + 0.5 * label_smoothing


def smooth_complement(y, label_smoothing: float):
    """``1 - ys`` of the smoothed target, as ``(1 - y)(1 - eps) + eps / 2`` (None without smoothing: then
    ``1 - y`` is computed where needed). Taken as ``1 - ys`` from the rounded ``ys``, it would keep only the
    rounding of ``ys`` near ``ys = 1``: for y = 1, eps = 1e-7 in float32, 1 - ys is 6e-8 instead of 5e-8,
    a 19 % error in the loss of a confident right answer."""
    if not label_smoothing:
        return None
    return (1.0 - y) * (1.0 - label_smoothing) + 0.5 * label_smoothing


class Pieces:
    """Shared sub-expressions of one evaluation: sign side, |x|, h = exp(-|x|/2), e = exp(-|x|)."""

    __slots__ = ("pos", "a", "h", "e", "one_e")

    def __init__(self, xp, x):
        self.pos = x >= 0
        self.a = xp.where(self.pos, x, -x)  # not abs(): its derivative at 0 would be 0
        self.h = xp.exp(-0.5 * self.a)
        self.e = self.h * self.h
        self.one_e = 1.0 + self.e


def _sides(xp, pc: Pieces, c_pos, c_neg):
    """Reorder per-term coefficients into (big-side, small-side) coefficients."""
    return xp.where(pc.pos, c_pos, c_neg), xp.where(pc.pos, c_neg, c_pos)


def _small_softplus(xp, pc: Pieces, c):
    """``c * log1p(e)`` without early underflow of e."""
    return xp.where(pc.a > SMALL_SIDE_LINEAR, (c * pc.h) * pc.h, c * xp.log1p(pc.e))


def _big_softplus(xp, pc: Pieces, c):
    """``c * (a + log1p(e))`` with 0 * inf = 0 (exact limit at |x| = inf)."""
    return xp.where(c == 0, 0.0, c * (pc.a + xp.log1p(pc.e)))


def _complement(y, omy):
    """``1 - y``: ``omy`` when the caller has it more exactly (see :func:`smooth_complement`)."""
    return 1.0 - y if omy is None else omy


def coefficients(y, w=None, p=None, omy=None):
    """Per-element coefficients of softplus(x) and softplus(-x): ``w(1-y)`` and ``w p y`` (``omy``: ``1 - y``
    when the caller has it more exactly than ``1.0 - y``, see :func:`smooth_complement`)."""
    c_pos = _complement(y, omy)
    c_neg = y if p is None else p * y
    if w is not None:
        c_pos = w * c_pos
        c_neg = w * c_neg
    return c_pos, c_neg


def loss(xp, x, y, w=None, p=None, pc: Pieces | None = None, omy=None):
    """Elementwise loss ``w[(1-y) softplus(x) + p y softplus(-x)]``."""
    pc = Pieces(xp, x) if pc is None else pc
    c_big, c_small = _sides(xp, pc, *coefficients(y, w, p, omy))
    return _big_softplus(xp, pc, c_big) + _small_softplus(xp, pc, c_small)


def grad_input(xp, x, y, w=None, p=None, pc: Pieces | None = None, omy=None):
    """Elementwise ``d loss / d x = w[(1-y) sigma(x) - p y sigma(-x)]``."""
    pc = Pieces(xp, x) if pc is None else pc
    c_big, c_small = _sides(xp, pc, *coefficients(y, w, p, omy))
    g = (c_big - (c_small * pc.h) * pc.h) / pc.one_e
    return xp.where(pc.pos, g, -g)


def grad_target(xp, x, y, w=None, p=None, pc: Pieces | None = None):
    """Elementwise ``d loss / d y = w[p softplus(-x) - softplus(x)]`` (before label smoothing)."""
    pc = Pieces(xp, x) if pc is None else pc
    one = xp.ones_like(x)
    c_neg = one if p is None else p * one
    c_big, c_small = _sides(xp, pc, -one, c_neg)
    # c_big*(a+log1p(e)) with c_big = -1 or p: at |x| = inf it is +-inf, the true limit.
    d = c_big * (pc.a + xp.log1p(pc.e)) + _small_softplus(xp, pc, c_small)
    return d if w is None else w * d


def log_one_minus_pt(xp, x, y, pc: Pieces | None = None, omy=None):
    r"""``log(1 - p_t)`` with ``p_t = sigma(x) y + sigma(-x)(1 - y)``, in log space.

    ``1 - p_t = (b + s e) / (1 + e)`` with ``b, s`` the (1-y, y) weights reordered to the big and
    small side; when ``b == 0`` (a hard target on the confident side) this is ``log(s) - a - log1p(e)``,
    finite for every finite x.
    """
    pc = Pieces(xp, x) if pc is None else pc
    b, s = _sides(xp, pc, _complement(y, omy), y)
    safe_b = xp.where(b == 0, s * pc.e + 1.0, b + s * pc.e)  # no log(0) in the unused branch
    lse = xp.where(b == 0, xp.log(s) - pc.a, xp.log(safe_b))
    return lse - xp.log1p(pc.e)


def d_log_one_minus_pt(xp, x, y, pc: Pieces | None = None, omy=None):
    r"""``d/dx log(1 - p_t) = (1 - 2y) sigma(x) sigma(-x) / (1 - p_t) = (1 - 2y) e / ((1 + e)(b + s e))``.

    Finite at saturated logits for every target: when ``b == 0`` the ratio ``e / (b + s e)`` is ``1/s``.
    """
    pc = Pieces(xp, x) if pc is None else pc
    b, s = _sides(xp, pc, _complement(y, omy), y)
    b0 = b == 0
    ratio = xp.where(b0, 1.0 / xp.where(s == 0, 1.0, s), pc.e / xp.where(b0, 1.0, b + s * pc.e))
    return ((1.0 - 2.0 * y) if omy is None else (omy - y)) * ratio / pc.one_e


def loss_times_dy_log_one_minus_pt(xp, x, y, w=None, p=None, pc: Pieces | None = None, omy=None):
    r"""``loss * d/dy log(1 - p_t)``, the focal term of the target's gradient, without 0 * inf.

    ``d/dy log(1 - p_t) = (sigma(-x) - sigma(x)) / (1 - p_t) = -+(1 - e) / (b + s e)``. When ``b == 0``
    (a hard target on its confident side) the loss is the small-side term alone, ``c log1p(e)``, and the
    product is ``c (-+(1 - e)) / s * log1p(e)/e``, finite for every x (``log1p(e)/e -> 1``).
    """
    pc = Pieces(xp, x) if pc is None else pc
    b, s = _sides(xp, pc, _complement(y, omy), y)
    num = xp.where(pc.pos, pc.e - 1.0, 1.0 - pc.e)
    b0 = b == 0
    _, c_small = _sides(xp, pc, *coefficients(y, w, p, omy))
    e_safe = xp.where(pc.e == 0, 1.0, pc.e)
    ratio = xp.where(pc.e == 0, 1.0, xp.log1p(pc.e) / e_safe)  # log1p(e)/e
    hard = c_small * num / xp.where(s == 0, 1.0, s) * ratio
    soft = loss(xp, x, y, w, p, pc, omy) * num / xp.where(b0, 1.0, b + s * pc.e)
    return xp.where(b0, hard, soft)


def evaluate(
    xp,
    x,
    y,
    w=None,
    p=None,
    *,
    label_smoothing: float = 0.0,
    ignore_index: float | None = None,
    focal_gamma: float = 0.0,
    want_loss: bool = True,
    want_grad: bool = False,
    want_grad_target: bool = False,
):
    r"""Elementwise loss and derivatives with every option applied; ``None`` for what is not wanted.

    - label smoothing: ``ys = y (1 - eps) + eps/2`` (so ``d/dy = (1 - eps) d/dys``);
    - focal term: ``loss_f = f * loss`` with ``f = (1 - p_t)^gamma = exp(gamma log(1 - p_t))`` and
      ``d loss_f = f (d loss + gamma loss d log(1 - p_t))``;
    - ignore_index: elements whose raw target equals it give exactly 0 for all three.
    """
    if ignore_index is not None:
        # Ignored elements are evaluated at a harmless point and masked at the end: their raw values
        # (a label like -100, a NaN logit of padding) never enter the math, not even masked branches,
        # whose NaNs would otherwise leak into double backward.
        keep = y != ignore_index
        x, y = xp.where(keep, x, 0.0), xp.where(keep, y, 0.0)
    ys = smooth_target(y, label_smoothing)
    omy = smooth_complement(y, label_smoothing)
    pc = Pieces(xp, x)
    loss_ = loss(xp, x, ys, w, p, pc, omy) if (want_loss or focal_gamma) else None
    g = grad_input(xp, x, ys, w, p, pc, omy) if want_grad else None
    gy = grad_target(xp, x, ys, w, p, pc) if want_grad_target else None
    if focal_gamma:
        f = xp.exp(focal_gamma * log_one_minus_pt(xp, x, ys, pc, omy))
        if g is not None:
            d = d_log_one_minus_pt(xp, x, ys, pc, omy)
            g = f * (g + xp.where(d == 0, 0.0, focal_gamma * loss_ * d))
        if gy is not None:
            gy = f * (gy + focal_gamma * loss_times_dy_log_one_minus_pt(xp, x, ys, w, p, pc, omy))
        loss_ = f * loss_
    if gy is not None and label_smoothing:
        gy = gy * (1.0 - label_smoothing)
    if ignore_index is not None:
        loss_, g, gy = (None if v is None else xp.where(keep, v, 0.0) for v in (loss_, g, gy))
    return (loss_ if want_loss else None), g, gy
