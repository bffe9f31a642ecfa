"""The numerical tolerances of the statistics, each named once with the reason for its size.

Permutation p-values count the relabellings whose statistic is at least as extreme as the observed one.
A relabelling that gives the same statistic in exact arithmetic can come out a few units in the last place
apart in floating point (sums in another order); without a tolerance such a tie is counted or missed by
chance, and the p-value of a discrete test moves by one step.
"""

from __future__ import annotations

#: ties of a statistic on the unit scale (a correlation, |rho| <= 1, computed as a dot product of centred
#: ranks): float rounding is ~1e-15 there, distinct values of the statistic differ by far more than 1e-12
UNIT_SCALE_TIE = 1e-12
#: ties of a statistic on the scale of its inputs (a sum of gains in points, a Friedman chi-square): the
#: sign-flip test multiplies it by the sum of |values| (rounding grows with the sum), Friedman's rank sums
#: are multiples of 0.5 whose chi-square values lie at least ~1e-3 apart
INPUT_SCALE_TIE = 1e-9
#: unit values (gains in points) that differ by less are constant: a test of them has zero variance
CONSTANT_VALUES = 1e-9
#: aligned values (minus their block mean) are rounded to this many decimals before ranking, so values equal
#: but for the rounding of the subtraction share a midrank
RANK_DECIMALS = 9
