#!/usr/bin/env python3
"""Deterministic generator for the ft_assets financial fine-tuning datasets.

Usage (from the repository root or anywhere)::

    python3 data/generate.py           # rewrite the four data files
    python3 data/generate.py --check   # exit 1 if a committed file differs
    python3 data/generate.py --stats   # print counts and context lengths

Outputs, all in the directory of this script:

* ``finqa.jsonl``             question answering over financial-document excerpts
                              (keys id, question, context, answer, kind)
* ``finqa_preferences.jsonl`` preference pairs for DPO
                              (keys id, prompt, chosen, rejected)
* ``fin_headlines.jsonl``     headline sentiment classification
                              (keys id, instruction, headline, label)
* ``finchat.jsonl``           multi-turn finance conversations (keys id, messages:
                              a list of {role, content} turns, system/user/assistant)

Approach
--------
Every row is built from templates filled by a ``random.Random`` seeded with a
fixed integer, so the files are byte-identical on every run (no clock, locale
or hash-order dependence; rows are serialised with ``sort_keys=True``).

A *template* invents a fictional company (name, sector, city, executives,
fiscal year) and a consistent set of integer figures, renders one excerpt of a
financial document (MD&A paragraph, plain-text table, press release, segment
note, balance sheet, cash-flow note, outlook, KPI paragraph, ...) and offers a
pool of question/answer items of three kinds:

* ``span``     -- a text span copied verbatim from the context;
* ``figure``   -- a number with its unit exactly as written in the context;
* ``computed`` -- a growth rate, margin, share, difference or sum computed
                  from integers shown in the context.

Figures are held as :class:`Amount` objects (an integer plus currency prefix,
unit suffix and number of decimals) and rendered once, so the answer text and
the context text cannot drift apart. Percentages are rounded half-up (away
from zero) to one decimal with integer arithmetic.

Each item also carries plausible wrong answers (another figure from the same
context, the other year's number, a sign-flipped or mis-rounded computation,
the wrong base, an invented name) used as ``rejected`` in the preference file.

Self-verification (run on every generation, failures raise):

* every span/figure answer occurs verbatim in its context (figures exactly
  once, at number boundaries), and every figure shown in a context is unique;
* every computed answer is recomputed by an independent code path that parses
  the figure strings back out of the context and redoes the arithmetic with
  ``decimal.Decimal`` and ``ROUND_HALF_UP``;
* contexts are 200-650 characters, (question, context) pairs are unique, the
  QA and preference files share no context, ``rejected`` never equals
  ``chosen`` and headlines are unique.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Callable

DATA_DIR = Path(__file__).resolve().parent
FINQA_FILE = "finqa.jsonl"
PREF_FILE = "finqa_preferences.jsonl"
HEADLINE_FILE = "fin_headlines.jsonl"
FINCHAT_FILE = "finchat.jsonl"

FINQA_SEED = 20240611
PREF_SEED = 77031
HEADLINE_SEED = 5150
FINQA_ROWS = 420
PREF_ROWS = 240
HEADLINE_ROWS = 240
FINCHAT_SEED = 90210
FINCHAT_ROWS = 300

KINDS = ("span", "figure", "computed")
MIN_CONTEXT, MAX_CONTEXT = 200, 650

# ---------------------------------------------------------------------------
# Vocabulary (all company, product and person names are invented)
# ---------------------------------------------------------------------------

NAME_HEADS = [
    "Harbor", "Silver", "Granite", "Blue", "North", "Cedar", "Iron", "Summit",
    "Crescent", "Aspen", "Copper", "Lake", "Red", "Falcon", "Beacon", "Orchard",
    "Stone", "Tide", "Juniper", "Kestrel", "Marlow", "Bright", "Ash", "Elm",
    "Maple", "Willow", "Osprey", "Heron", "Sable", "Amber", "Cobalt", "Larch",
    "Thistle", "Quill", "Wren", "Pine", "Alder", "Birch", "Flint", "Hollis",
]
NAME_TAILS = [
    "Ridge", "Point", "Peak", "Vale", "Crest", "Hollow", "Field", "Gate",
    "Brook", "Haven", "Wood", "Water", "Mark", "Line", "Bridge", "Ford",
    "Moor", "Glen", "Shore", "Run",
]

SECTORS = {
    "retail": {
        "words": ["Outfitters", "Stores", "Home Goods", "Apparel Group", "Retail"],
        "segments": ["Apparel", "Home Furnishings", "Footwear", "Beauty",
                     "Digital Commerce", "Grocery"],
    },
    "software": {
        "words": ["Software", "Systems", "Analytics", "Cloud", "Labs"],
        "segments": ["Cloud Platform", "Security Solutions", "Data Analytics",
                     "Professional Services", "Developer Tools", "Collaboration"],
    },
    "banking": {
        "words": ["Bancorp", "Financial", "Bancshares", "Savings Bank"],
        "segments": ["Commercial Banking", "Consumer Banking", "Wealth Management",
                     "Mortgage Banking", "Treasury Services"],
    },
    "energy": {
        "words": ["Energy", "Petroleum", "Resources", "Oil & Gas"],
        "segments": ["Upstream", "Midstream", "Refining", "Renewables",
                     "Marketing and Trading"],
    },
    "manufacturing": {
        "words": ["Industries", "Manufacturing", "Components", "Machinery", "Precision"],
        "segments": ["Industrial Automation", "Fluid Handling", "Aerospace Components",
                     "Power Tools", "Precision Bearings"],
    },
    "healthcare": {
        "words": ["Health", "Medical", "Therapeutics", "Biosciences"],
        "segments": ["Medical Devices", "Diagnostics", "Pharmaceuticals",
                     "Clinical Services", "Home Health"],
    },
    "telecom": {
        "words": ["Communications", "Telecom", "Networks", "Wireless"],
        "segments": ["Consumer Wireless", "Enterprise Solutions", "Fiber Broadband",
                     "Wholesale", "Media Services"],
    },
    "logistics": {
        "words": ["Logistics", "Freight", "Transport"],
        "segments": ["Truckload", "Intermodal", "Warehousing", "Freight Brokerage",
                     "Last-Mile Delivery"],
    },
    "food": {
        "words": ["Foods", "Brands", "Beverages"],
        "segments": ["Snacks", "Beverages", "Frozen Foods", "Dairy", "Foodservice"],
    },
    "media": {
        "words": ["Media", "Entertainment", "Studios"],
        "segments": ["Streaming", "Studios", "Advertising", "Live Events", "Publishing"],
    },
}

CITIES = {
    "$": ["Columbus", "Denver", "Raleigh", "Minneapolis", "Portland", "Austin",
          "Pittsburgh", "Tampa", "Omaha", "Hartford", "Milwaukee", "Charlotte",
          "Boise", "Richmond", "Louisville", "Tucson", "Sacramento", "Madison"],
    "€": ["Rotterdam", "Lyon", "Munich", "Milan", "Dublin", "Antwerp", "Porto", "Graz"],
    "£": ["Manchester", "Leeds", "Bristol", "Edinburgh", "Cardiff", "Belfast"],
}
FIRST_NAMES = [
    "Maria", "James", "Priya", "Daniel", "Elena", "Marcus", "Aisha", "Thomas",
    "Sofia", "Kenji", "Laura", "Omar", "Grace", "Victor", "Hannah", "Rafael",
    "Ingrid", "Samuel", "Nadia", "Patrick", "Mei", "Carlos", "Fiona", "Adrian",
    "Leah", "Tobias", "Yara", "Gregory", "Anika", "Desmond",
]
LAST_NAMES = [
    "Okafor", "Lindqvist", "Ramirez", "Whitfield", "Castellano", "Nakamura",
    "Brennan", "Adeyemi", "Kowalski", "Haldane", "Moreau", "Pennington",
    "Achterberg", "Delgado", "Sutherland", "Varga", "Ellison", "Thorne",
    "Mbeki", "Rasmussen", "Caldwell", "Iverson", "Fairbanks", "Quintero",
    "Holloway", "Marchetti", "Oyelaran", "Sandoval", "Westbrook", "Lachance",
]
COUNTRIES = ["Mexico", "Canada", "Poland", "India", "Ireland", "Brazil", "Germany",
             "Vietnam", "Portugal", "Malaysia"]
US_STATES = ["Ohio", "Texas", "Florida", "Georgia", "Arizona", "Colorado",
             "Tennessee", "Michigan", "Virginia", "Oregon", "Missouri", "Wisconsin"]
BASINS = ["Permian Basin", "Williston Basin", "Anadarko Basin", "Appalachian Basin",
          "Denver-Julesburg Basin", "Eagle Ford shale"]
FINANCING_USES = ["share repurchases", "the repayment of term loans",
                  "the redemption of senior notes", "the settlement of commercial paper"]
PRODUCT_HEADS = ["Pulse", "Ledgerline", "Northstar", "Keystone", "Lumen", "Atlas",
                 "Vantage", "Helix", "Cirrus", "Beacon", "Tessera", "Orbit"]
PRODUCT_TAILS = ["Cloud", "Suite", "Hub", "One", "360", "Insights", "Workspace"]
DRUG_HEADS = ["Zel", "Vor", "Tral", "Nex", "Lum", "Cor", "Pral", "Quen", "Dav", "Ser",
              "Mir", "Tal"]
DRUG_TAILS = ["ovir", "umab", "izant", "entra", "axin", "olid", "evra", "itrex"]
INDICATIONS = ["plaque psoriasis", "type 2 diabetes", "chronic migraine",
               "atopic dermatitis", "rheumatoid arthritis", "ulcerative colitis",
               "heart failure", "major depressive disorder"]
TRIAL_NAMES = ["BRIGHTPATH", "KESTREL-3", "HORIZON-2", "CLEARVIEW", "SUMMIT-4",
               "MERIDIAN", "TIDEWATER-1", "NORTHLIGHT"]
CALL_TIMES = ["8:00 a.m.", "8:30 a.m.", "9:00 a.m.", "10:00 a.m.", "4:30 p.m.", "5:00 p.m."]
CEO_QUOTES = [
    "Our teams delivered disciplined execution and solid customer demand this quarter.",
    "We continued to invest in our core markets while managing costs carefully.",
    "The quarter reflected steady progress on our long-term priorities.",
    "We remain focused on profitable growth and strong cash generation.",
    "Demand trends were mixed, but our cost actions are gaining traction.",
]
MONTHS = ["January", "February", "March", "April", "May", "June", "July",
          "August", "September", "October", "November", "December"]
ORDINALS = ["first", "second", "third", "fourth"]


# ---------------------------------------------------------------------------
# Figures and arithmetic (primary code path: integers only)
# ---------------------------------------------------------------------------

class Retry(Exception):
    """Raised when random draws produced an invalid scene; the caller redraws."""


@dataclass(frozen=True)
class Amount:
    """An integer figure rendered with a currency prefix, unit suffix and decimals.

    ``value`` is expressed in the smallest displayed unit: millions for
    "$4,512 million", cents for "$0.42", tenths for "3.7%", people for
    "1,250 employees".
    """

    value: int
    prefix: str = ""
    suffix: str = ""
    decimals: int = 0

    @property
    def text(self) -> str:
        sign = "-" if self.value < 0 else ""
        whole, frac = divmod(abs(self.value), 10 ** self.decimals)
        number = f"{whole:,}" + (f".{frac:0{self.decimals}d}" if self.decimals else "")
        return f"{sign}{self.prefix}{number}{self.suffix}"

    def like(self, value: int) -> "Amount":
        """Same unit convention, different value."""
        return Amount(value, self.prefix, self.suffix, self.decimals)

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Check:
    """Recipe for the independent re-computation of a computed answer.

    ``num``/``den`` are (coefficient, figure text) terms that must occur in
    the context. op "pct": 100 * sum(num) / sum(den), one decimal.
    op "amount": sum(num) * mul / div in the unit of the terms.
    """

    op: str
    num: tuple[tuple[int, str], ...]
    den: tuple[tuple[int, str], ...] = ()
    mul: int = 1
    div: int = 1


@dataclass(frozen=True)
class Computed:
    answer: str
    check: Check
    wrong: tuple[str, ...]


def pct_tenths(num: int, den: int) -> int:
    """100 * num / den in tenths of a percent, rounded half-up (away from zero)."""
    if den <= 0:
        raise ValueError("denominator must be positive")
    tenths, rem = divmod(abs(num) * 1000, den)
    if 2 * rem >= den:
        tenths += 1
    return -tenths if num < 0 else tenths


def fmt_tenths(tenths: int) -> str:
    sign = "-" if tenths < 0 else ""
    return f"{sign}{abs(tenths) // 10}.{abs(tenths) % 10}%"


def _terms(terms: list[tuple[int, Amount]]) -> tuple[tuple[int, str], ...]:
    return tuple((coef, amount.text) for coef, amount in terms)


def ratio(num: list[tuple[int, Amount]], den: list[tuple[int, Amount]],
          wrong: tuple[str, ...] = ()) -> Computed:
    """A percentage with one decimal; default wrong answers are rounding slips."""
    n = sum(coef * a.value for coef, a in num)
    d = sum(coef * a.value for coef, a in den)
    tenths = pct_tenths(n, d)
    if tenths == 0:
        raise Retry  # "0.0%" vs "-0.0%" is a needless ambiguity
    truncated = (abs(n) * 1000 // d) * (-1 if n < 0 else 1)
    slips = [fmt_tenths(truncated if truncated != tenths else tenths + 1),
             fmt_tenths(tenths - 1)]
    return Computed(fmt_tenths(tenths), Check("pct", _terms(num), _terms(den)),
                    tuple(wrong) + tuple(slips))


def growth(old: Amount, new: Amount) -> Computed:
    """Period-over-period change in percent."""
    delta = new.value - old.value
    wrong = (fmt_tenths(-pct_tenths(delta, old.value)),       # sign flipped
             fmt_tenths(pct_tenths(delta, new.value)),         # wrong base
             fmt_tenths(pct_tenths(new.value, old.value)))     # ratio, not change
    return ratio([(1, new), (-1, old)], [(1, old)], wrong)


def margin(revenue: Amount, *costs: Amount) -> Computed:
    """(revenue - costs) / revenue in percent."""
    kept = revenue.value - sum(c.value for c in costs)
    wrong = (fmt_tenths(1000 - pct_tenths(kept, revenue.value)),)  # cost ratio
    if len(costs) > 1:
        wrong += (fmt_tenths(pct_tenths(revenue.value - costs[0].value, revenue.value)),)
    return ratio([(1, revenue)] + [(-1, c) for c in costs], [(1, revenue)], wrong)


def share(part: Amount, parts: list[Amount]) -> Computed:
    """part / sum(parts) in percent."""
    others = [p for p in parts if p is not part]
    wrong = tuple(fmt_tenths(pct_tenths(part.value, o.value)) for o in others
                  if o.value > part.value)
    return ratio([(1, part)], [(1, p) for p in parts], wrong)


def combo(terms: list[tuple[int, Amount]], mul: int = 1, div: int = 1,
          wrong: tuple[str, ...] = ()) -> Computed:
    """A linear combination of figures, in the unit of the first term."""
    total = sum(coef * a.value for coef, a in terms) * mul
    if total % div:
        raise ValueError("combo result must be a whole number of units")
    unit = terms[0][1]
    answer = unit.like(total // div).text
    defaults = [a.text for _, a in terms]                    # an input, not the result
    if any(coef < 0 for coef, _ in terms):
        defaults.append(unit.like(sum(abs(c) * a.value for c, a in terms)).text)
    return Computed(answer, Check("amount", _terms(terms), (), mul, div),
                    tuple(wrong) + tuple(defaults))


def diff(big: Amount, small: Amount, wrong: tuple[str, ...] = ()) -> Computed:
    return combo([(1, big), (-1, small)], wrong=wrong)


# ---------------------------------------------------------------------------
# Independent verification (second code path: parse the context, Decimal maths)
# ---------------------------------------------------------------------------

_FIGURE_RE = re.compile(
    r"^(?P<sign>-?)(?P<prefix>[^\d-]*)(?P<num>\d{1,3}(?:,\d{3})*(?:\.\d+)?)(?P<suffix>.*)$")


def occurrences(text: str, context: str) -> int:
    """Occurrences of a figure in the context that are not part of a longer number."""
    pattern = r"(?<![\w,.$€£-])" + re.escape(text) + r"(?![\w])(?![.,]\d)"
    return len(re.findall(pattern, context))


def parse_figure(text: str) -> tuple[Decimal, str, str, int]:
    match = _FIGURE_RE.match(text)
    if not match:
        raise AssertionError(f"not a figure: {text!r}")
    number = match["num"]
    decimals = len(number.split(".")[1]) if "." in number else 0
    value = Decimal(number.replace(",", ""))
    return (-value if match["sign"] else value), match["prefix"], match["suffix"], decimals


def recompute(check: Check, context: str) -> str:
    """Recompute a computed answer from figure strings found in the context."""
    for _, text in check.num + check.den:
        if occurrences(text, context) < 1:
            raise AssertionError(f"formula input {text!r} not in context")
    num = [(coef, parse_figure(text)) for coef, text in check.num]
    if check.op == "pct":
        den = [(coef, parse_figure(text)) for coef, text in check.den]
        top = sum(Decimal(coef) * fig[0] for coef, fig in num)
        bottom = sum(Decimal(coef) * fig[0] for coef, fig in den)
        value = (top / bottom * 100).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)
        return f"{value}%"
    units = {(fig[1], fig[2], fig[3]) for _, fig in num}
    if len(units) != 1:
        raise AssertionError(f"mixed units in {check}")
    prefix, suffix, decimals = units.pop()
    total = sum(Decimal(coef) * fig[0] for coef, fig in num) * check.mul / check.div
    total = total.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)
    sign = "-" if total < 0 else ""
    return f"{sign}{prefix}{abs(total):,.{decimals}f}{suffix}"


# ---------------------------------------------------------------------------
# Companies and scenes
# ---------------------------------------------------------------------------

@dataclass
class Company:
    name: str
    sector: str
    currency: str
    city: str
    ceo: str
    cfo: str
    ticker: str
    exchange: str
    year: int
    segments: list[str]

    @property
    def poss(self) -> str:
        """Possessive form: "Harbor Ridge Logistics'" / "Cedar Vale Software's"."""
        plural = self.name.endswith("s") and not self.name.endswith("Gas")
        return self.name + ("'" if plural else "'s")

    def money(self, value: int) -> Amount:
        return Amount(value, self.currency, " million")

    def money_short(self, value: int) -> Amount:
        return Amount(value, self.currency, "M")

    def cents(self, value: int, suffix: str = "") -> Amount:
        return Amount(value, self.currency, suffix, 2)


def person(rng: random.Random, exclude: tuple[str, ...] = ()) -> str:
    while True:
        name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
        if name not in exclude:
            return name


def make_company(rng: random.Random, sector: str | None = None) -> Company:
    sector = sector or rng.choice(sorted(SECTORS))
    head, tail = rng.choice(NAME_HEADS), rng.choice(NAME_TAILS)
    stem = f"{head} {tail}" if rng.random() < 0.6 else f"{head}{tail.lower()}"
    name = f"{stem} {rng.choice(SECTORS[sector]['words'])}"
    currency = rng.choice(["$"] * 6 + ["€", "£"])
    ceo = person(rng)
    cfo = person(rng, (ceo,))
    letters = [w[0] for w in name.replace("&", "").split()]
    ticker = "".join(letters + [rng.choice("KMQVXZ")])[:4].upper()
    exchange = {"$": rng.choice(["NYSE", "Nasdaq"]), "€": "Euronext", "£": "LSE"}[currency]
    segments = rng.sample(SECTORS[sector]["segments"], 3)
    return Company(name, sector, currency, rng.choice(CITIES[currency]), ceo, cfo,
                   ticker, exchange, rng.randint(2019, 2025), segments)


@dataclass
class Item:
    kind: str
    question: str
    answer: str
    wrong: tuple[str, ...]
    check: Check | None = None

    def __post_init__(self) -> None:
        # Wrong answers: unique, in order of preference, never the right answer.
        self.wrong = tuple(w for w in dict.fromkeys(self.wrong) if w != self.answer)


@dataclass
class Scene:
    """Collects the figures shown in a context and the questions about it."""

    company: Company
    amounts: list[Amount] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)

    def show(self, amount: Amount) -> str:
        """Register a figure that appears in the context and return its text."""
        self.amounts.append(amount)
        return amount.text

    def span(self, question: str, answer: str, *wrong: str) -> None:
        self.items.append(Item("span", question, answer, tuple(wrong)))

    def figure(self, question: str, amount: Amount, *wrong: Amount) -> None:
        """A figure answer; wrong answers default to same-unit figures from the context."""
        explicit = [w.text for w in wrong]
        others = [t for t in self.related(amount) if t not in explicit]
        self.items.append(Item("figure", question, amount.text, tuple(explicit + others)))

    def computed(self, question: str, result: Computed) -> None:
        self.items.append(Item("computed", question, result.answer, result.wrong, result.check))

    def finish(self, template: str, context: str) -> "Scenario":
        return Scenario(template, context, self.items, [a.text for a in self.amounts])

    def related(self, amount: Amount) -> list[str]:
        """Other figures in this context with the same unit (plausible confusions)."""
        return [a.text for a in self.amounts
                if a.text != amount.text and (a.prefix, a.suffix, a.decimals)
                == (amount.prefix, amount.suffix, amount.decimals)]


@dataclass
class Scenario:
    template: str
    context: str
    items: list[Item]
    figures: list[str]


def vary(rng: random.Random, base: int, lo: int, hi: int, min_abs: int = 12) -> int:
    """base changed by a random per-mille amount in [lo, hi], at least min_abs."""
    while True:
        permille = rng.randint(lo, hi)
        if abs(permille) >= min_abs:
            value = base * (1000 + permille) // 1000
            if value != base and value > 0:
                return value


def part(rng: random.Random, base: int, lo: int, hi: int) -> int:
    """A random per-mille share of base (lo..hi per mille), at least 1."""
    return max(1, base * rng.randint(lo, hi) // 1000)


def date_text(year: int, month: int, day: int) -> str:
    return f"{MONTHS[month - 1]} {day}, {year}"


def up_down(new: int, old: int, up: str, down: str) -> str:
    return up if new > old else down


def pick(rng: random.Random, *options: str) -> str:
    return rng.choice(options)


# ---------------------------------------------------------------------------
# Context templates. Each returns a Scenario with items of every kind.
# ---------------------------------------------------------------------------

def tpl_mdna(rng: random.Random) -> Scenario:
    """Narrative MD&A paragraph on annual revenue, costs and net income."""
    co = make_company(rng)
    s = Scene(co)
    y0, y1 = co.year - 1, co.year
    seg_a, seg_b = co.segments[:2]
    rev0 = co.money(rng.randint(250, 9000))
    rev1 = co.money(vary(rng, rev0.value, -120, 260))
    cost1 = co.money(part(rng, rev1.value, 380, 760))
    opex1 = co.money(part(rng, rev1.value - cost1.value, 300, 800))
    ni1 = co.money(part(rng, rev1.value - cost1.value - opex1.value, 500, 820))
    grew = rev1.value > rev0.value
    if grew:
        driver = (f"higher volumes in the {seg_a} segment, partially offset by "
                  f"softer demand in {seg_b}")
    else:
        driver = (f"lower volumes in the {seg_a} segment, partially offset by "
                  f"growth in {seg_b}")
    if rng.random() < 0.5:
        context = (
            f"{co.name} reported revenue of {s.show(rev1)} for fiscal {y1}, compared with "
            f"{s.show(rev0)} for fiscal {y0}. The {'increase' if grew else 'decline'} "
            f"reflected {driver}. Cost of revenue was {s.show(cost1)} and operating "
            f"expenses were {s.show(opex1)}. Net income for fiscal {y1} totaled {s.show(ni1)}.")
    else:
        context = (
            f"Results of operations. Revenue {'increased' if grew else 'decreased'} to "
            f"{s.show(rev1)} in fiscal {y1} from {s.show(rev0)} in fiscal {y0}, primarily "
            f"due to {driver}. Cost of revenue for fiscal {y1} was {s.show(cost1)}, while "
            f"operating expenses amounted to {s.show(opex1)}. {co.name} recorded net income "
            f"of {s.show(ni1)} for the year.")
    if grew:
        s.span(f"Which segment's higher volumes drove {co.poss} revenue increase in fiscal {y1}?",
               seg_a, seg_b)
        s.span(f"In which segment did {co.name} see softer demand in fiscal {y1}?", seg_b, seg_a)
    else:
        s.span(f"Which segment's lower volumes caused {co.poss} revenue decline in fiscal {y1}?",
               seg_a, seg_b)
        s.span(f"Which segment grew and partially offset {co.poss} revenue decline in fiscal {y1}?",
               seg_b, seg_a)
    s.figure(f"What revenue did {co.name} report for fiscal {y0}?", rev0, rev1)
    s.figure(f"What was {co.poss} cost of revenue in fiscal {y1}?", cost1, opex1, rev1)
    s.figure(f"How much were {co.poss} operating expenses in fiscal {y1}?", opex1, cost1)
    s.figure(f"What was {co.poss} net income for fiscal {y1}?", ni1, opex1)
    s.computed(f"By what percentage did {co.poss} revenue change from fiscal {y0} to fiscal "
               f"{y1}? Round to one decimal place.", growth(rev0, rev1))
    s.computed(f"What was {co.poss} gross margin in fiscal {y1}, in percent to one decimal?",
               margin(rev1, cost1))
    s.computed(f"What was {co.poss} gross profit in fiscal {y1}?", diff(rev1, cost1))
    s.computed(f"What was {co.poss} operating income in fiscal {y1} (revenue minus cost of "
               f"revenue and operating expenses)?",
               combo([(1, rev1), (-1, cost1), (-1, opex1)]))
    s.computed(f"What was {co.poss} operating margin in fiscal {y1}, in percent to one decimal?",
               margin(rev1, cost1, opex1))
    return s.finish("mdna", context)


def tpl_selected_table(rng: random.Random) -> Scenario:
    """Plain-text two-year table of selected financial data."""
    co = make_company(rng)
    s = Scene(co)
    y0, y1 = co.year - 1, co.year
    rev_label = pick(rng, "Revenue", "Net sales", "Total revenue")
    rev = [co.money_short(rng.randint(300, 9000))]
    rev.append(co.money_short(vary(rng, rev[0].value, -100, 250)))
    cost = [co.money_short(part(rng, r.value, 400, 750)) for r in rev]
    op = [co.money_short(part(rng, r.value - c.value, 200, 650)) for r, c in zip(rev, cost)]
    ni = [co.money_short(part(rng, o.value, 550, 800)) for o in op]
    eps = [co.cents(rng.randint(40, 900))]
    eps.append(co.cents(eps[0].value * ni[1].value // ni[0].value))
    if eps[0].value == eps[1].value:
        raise Retry
    rows = [(rev_label, rev), ("Cost of revenue", cost), ("Operating income", op),
            ("Net income", ni), ("Diluted EPS", eps)]
    title = pick(rng, f"{co.name} - Selected financial data (fiscal years)",
                 f"{co.name}: five-line financial summary",
                 f"Selected consolidated financial data, {co.name}")
    lines = [title, f"Item | {y0} | {y1}"]
    lines += [f"{label} | {s.show(a)} | {s.show(b)}" for label, (a, b) in rows]
    context = "\n".join(lines)
    years = (str(y0), str(y1))
    for label, pair in (("operating income", op), ("net income", ni)):
        hi = 0 if pair[0].value > pair[1].value else 1
        s.span(f"In which fiscal year was {co.poss} {label} higher, {y0} or {y1}?",
               years[hi], years[1 - hi])
    for label, pair in rows:
        idx = rng.randint(0, 1)
        s.figure(f"What figure does the table report for {label} in {years[idx]}?",
                 pair[idx], pair[1 - idx])
    s.computed(f"What was the year-over-year growth in {rev_label.lower()} from {y0} to {y1}, "
               f"in percent to one decimal?", growth(rev[0], rev[1]))
    idx = rng.randint(0, 1)
    s.computed(f"What was {co.poss} gross margin in fiscal {years[idx]}, rounded to one decimal?",
               margin(rev[idx], cost[idx]))
    idx = rng.randint(0, 1)
    s.computed(f"What was the operating margin (operating income divided by "
               f"{rev_label.lower()}) in fiscal {years[idx]}, to one decimal?",
               ratio([(1, op[idx])], [(1, rev[idx])],
                     (fmt_tenths(pct_tenths(op[idx].value, rev[1 - idx].value)),)))
    big, small = (ni[1], ni[0]) if ni[1].value > ni[0].value else (ni[0], ni[1])
    direction = "increase" if ni[1].value > ni[0].value else "decrease"
    s.computed(f"By how much did net income {direction} from {y0} to {y1}?", diff(big, small))
    s.computed(f"By what percentage did diluted EPS change from {y0} to {y1}? Round to one decimal.",
               growth(eps[0], eps[1]))
    return s.finish("selected_table", context)


def tpl_press_release(rng: random.Random) -> Scenario:
    """Quarterly earnings press release with dateline, ticker and CEO quote."""
    co = make_company(rng)
    s = Scene(co)
    q = rng.randint(1, 4)
    fy = co.year
    ordinal = ORDINALS[q - 1]
    release_year, release_month = (fy + 1, 2) if q == 4 else (fy, 3 * q + 1)
    released = date_text(release_year, release_month, rng.randint(2, 28))
    r0 = co.money(rng.randint(80, 4000))
    r1 = co.money(vary(rng, r0.value, -150, 300))
    ni = co.money(part(rng, r1.value, 30, 180))
    eps = co.cents(rng.randint(5, 350))
    quote = rng.choice(CEO_QUOTES)
    verb = up_down(r1.value, r0.value, "rose", "fell")
    if rng.random() < 0.5:
        context = (
            f"{co.city}, {released} -- {co.name} ({co.exchange}: {co.ticker}) today reported "
            f"results for the {ordinal} quarter of fiscal {fy}. Revenue was {s.show(r1)}, compared "
            f"with {s.show(r0)} in the {ordinal} quarter of fiscal {fy - 1}. Net income was "
            f"{s.show(ni)}, or {s.show(eps)} per diluted share. \"{quote[:-1]},\" said {co.ceo}, "
            f"chief executive officer.")
        s.span(f"In which city was {co.poss} earnings release issued?", co.city,
               rng.choice([c for c in CITIES[co.currency] if c != co.city]))
    else:
        context = (
            f"{co.name} ({co.exchange}: {co.ticker}), headquartered in {co.city}, announced "
            f"{ordinal}-quarter fiscal {fy} results on {released}. Quarterly revenue {verb} to "
            f"{s.show(r1)} from {s.show(r0)} a year earlier, and net income was {s.show(ni)}, "
            f"or {s.show(eps)} per diluted share. Chief executive officer {co.ceo} said: "
            f"\"{quote}\"")
        s.span(f"Where is {co.name} headquartered?", co.city,
               rng.choice([c for c in CITIES[co.currency] if c != co.city]))
    s.span(f"Who is the chief executive officer of {co.name}?", co.ceo, co.cfo)
    s.span(f"Under which ticker symbol does {co.name} trade?", co.ticker,
           co.ticker[:-1] + rng.choice("ABR"))
    s.figure(f"What were {co.poss} diluted earnings per share in the {ordinal} quarter of "
             f"fiscal {fy}?", eps)
    s.figure(f"What net income did {co.name} report for the {ordinal} quarter of fiscal {fy}?",
             ni, r1)
    s.figure(f"What was {co.poss} revenue in the {ordinal} quarter of fiscal {fy - 1}?", r0, r1)
    s.computed(f"By what percentage did {co.poss} quarterly revenue change year over year? "
               f"Round to one decimal place.", growth(r0, r1))
    s.computed(f"What was {co.poss} net profit margin in the {ordinal} quarter of fiscal {fy}, "
               f"in percent to one decimal?", ratio([(1, ni)], [(1, r1)],
                                                   (fmt_tenths(pct_tenths(ni.value, r0.value)),)))
    big, small = (r1, r0) if r1.value > r0.value else (r0, r1)
    s.computed(f"By how much did {co.poss} quarterly revenue "
               f"{'increase' if r1.value > r0.value else 'decrease'} year over year?",
               diff(big, small))
    return s.finish("press_release", context)


def tpl_segments(rng: random.Random) -> Scenario:
    """Segment note: three segments with revenue and operating income."""
    co = make_company(rng)
    s = Scene(co)
    y = co.year
    names = co.segments
    revenue = [co.money(rng.randint(120, 3500)) for _ in names]
    op_inc = [co.money(part(rng, r.value, 60, 280)) for r in revenue]
    corp = co.money(rng.randint(15, 160))
    if rng.random() < 0.5:
        body = "; ".join(f"{n} generated revenue of {s.show(r)} and operating income of {s.show(o)}"
                         for n, r, o in zip(names, revenue, op_inc))
        context = (f"Segment information. {co.name} reports three segments. In fiscal {y}, "
                   f"{body}. Unallocated corporate expenses were {s.show(corp)}.")
    else:
        rows = [f"{n} | {s.show(r)} | {s.show(o)}" for n, r, o in zip(names, revenue, op_inc)]
        context = "\n".join(
            [f"{co.name} - segment results, fiscal {y}", "Segment | Revenue | Operating income"]
            + rows + [f"Corporate expenses not allocated to segments: {s.show(corp)}"])
    order = sorted(range(3), key=lambda i: revenue[i].value)
    s.span(f"Which segment generated the most revenue for {co.name} in fiscal {y}?",
           names[order[2]], names[order[1]])
    s.span(f"Which segment had the lowest revenue in fiscal {y}?", names[order[0]], names[order[1]])
    best = max(range(3), key=lambda i: op_inc[i].value)
    s.span(f"Which segment reported the highest operating income in fiscal {y}?", names[best],
           names[order[2]] if order[2] != best else names[order[1]])
    i = rng.randrange(3)
    s.figure(f"What revenue did the {names[i]} segment generate in fiscal {y}?", revenue[i],
             op_inc[i], revenue[(i + 1) % 3])
    j = rng.randrange(3)
    s.figure(f"What was the operating income of the {names[j]} segment in fiscal {y}?", op_inc[j],
             revenue[j], op_inc[(j + 1) % 3])
    s.figure(f"How much were {co.poss} unallocated corporate expenses in fiscal {y}?", corp)
    s.computed(f"What was {co.poss} total revenue across the three segments in fiscal {y}?",
               combo([(1, r) for r in revenue]))
    a, b = rng.sample(range(3), 2)
    s.computed(f"What was the combined revenue of the {names[a]} and {names[b]} segments?",
               combo([(1, revenue[a]), (1, revenue[b])]))
    k = rng.randrange(3)
    s.computed(f"What was the operating margin of the {names[k]} segment, in percent to one decimal?",
               ratio([(1, op_inc[k])], [(1, revenue[k])]))
    m = rng.randrange(3)
    s.computed(f"What share of total segment revenue came from {names[m]}, in percent to one decimal?",
               share(revenue[m], revenue))
    s.computed(f"What was total operating income after unallocated corporate expenses in fiscal {y}?",
               combo([(1, o) for o in op_inc] + [(-1, corp)]))
    s.computed(f"How much more revenue did {names[order[2]]} generate than {names[order[0]]}?",
               diff(revenue[order[2]], revenue[order[0]]))
    return s.finish("segments", context)


def tpl_balance_sheet(rng: random.Random) -> Scenario:
    """Condensed balance-sheet excerpt, as a sentence list or as labelled lines."""
    co = make_company(rng)
    s = Scene(co)
    month, day = rng.choice([(12, 31), (9, 30), (6, 30), (3, 31), (1, 31)])
    as_of = date_text(co.year, month, day)
    cash = co.money(rng.randint(40, 2500))
    ar = co.money(rng.randint(60, 2200))
    inv = co.money(rng.randint(50, 1800))
    tca = co.money(cash.value + ar.value + inv.value + rng.randint(10, 400))
    tcl = co.money(part(rng, tca.value, 350, 950))
    ltd = co.money(rng.randint(100, 5000))
    eq = co.money(rng.randint(ltd.value // 3 + 50, ltd.value * 3 + 200))
    entries = [("cash and cash equivalents", cash), ("accounts receivable, net", ar),
               ("inventories", inv), ("total current assets", tca),
               ("total current liabilities", tcl), ("long-term debt", ltd),
               ("total shareholders' equity", eq)]
    if rng.random() < 0.5:
        listed = "; ".join(f"{label}, {s.show(a)}" for label, a in entries[:-1])
        context = (f"Condensed balance sheet data for {co.name} as of {as_of}: {listed}; and "
                   f"{entries[-1][0]}, {s.show(eq)}.")
    else:
        lines = [f"{co.name} | Balance sheet highlights as of {as_of}"]
        lines += [f"{label[0].upper() + label[1:]}: {s.show(a)}" for label, a in entries]
        context = "\n".join(lines)
    other_year = date_text(co.year - 1, month, day)
    s.span(f"As of what date are {co.poss} balance sheet figures presented?", as_of, other_year)
    as_sentence = context.startswith("Condensed")
    shown = [(label if as_sentence else label[0].upper() + label[1:], amount)
             for label, amount in entries]
    line, amount = rng.choice(shown)
    s.span(f"Which balance sheet line item is reported at {amount.text}?", line,
           *[other for other, _ in shown if other != line][:1])
    for label, amount in rng.sample(entries, 3):
        s.figure(f"What amount of {label} did {co.name} report as of {as_of}?", amount)
    s.computed(f"What was {co.poss} working capital (total current assets minus total current "
               f"liabilities) as of {as_of}?", diff(tca, tcl))
    s.computed(f"What was {co.poss} long-term debt as a percentage of total shareholders' "
               f"equity, to one decimal?", ratio([(1, ltd)], [(1, eq)],
                                                  (fmt_tenths(pct_tenths(eq.value, ltd.value)),)))
    s.computed(f"What was the sum of cash and cash equivalents and accounts receivable?",
               combo([(1, cash), (1, ar)]))
    s.computed(f"What percentage of total current assets was cash and cash equivalents, "
               f"to one decimal?", share(cash, [tca]))
    return s.finish("balance_sheet", context)


def tpl_workforce(rng: random.Random) -> Scenario:
    """Human-capital disclosure: headcount, geography, unions, headquarters."""
    co = make_company(rng)
    s = Scene(co)
    y0, y1 = co.year - 1, co.year
    month, day = rng.choice([(12, 31), (9, 30), (6, 30)])
    h0 = Amount(rng.randint(800, 60000), suffix=" employees")
    h1 = h0.like(vary(rng, h0.value, -90, 160))
    union = h0.like(part(rng, h1.value, 40, 350))
    pct = Amount(rng.randint(18, 71), suffix="%")
    country = rng.choice(COUNTRIES)
    if rng.random() < 0.5:
        when0, when1 = date_text(y0, month, day), date_text(y1, month, day)
        context = (
            f"Human capital. As of {when1}, {co.name} had {s.show(h1)}, compared with "
            f"{s.show(h0)} as of {when0}. Approximately {s.show(pct)} of our workforce is based "
            f"in {country}, and {s.show(union)} are covered by collective bargaining agreements. "
            f"Our headquarters is located in {co.city}.")
    else:
        when0, when1 = f"the end of fiscal {y0}", f"the end of fiscal {y1}"
        context = (
            f"Employees. {co.name}, which is headquartered in {co.city}, employed {s.show(h1)} at "
            f"the end of fiscal {y1} ({s.show(h0)} a year earlier). About {s.show(pct)} of the "
            f"workforce works in {country}. Collective bargaining agreements cover {s.show(union)}. "
            f"We consider our relations with employees to be good.")
    s.span(f"In which country is about {pct.text} of {co.poss} workforce based?", country,
           rng.choice([c for c in COUNTRIES if c != country]))
    s.span(f"In which city is {co.name} headquartered?", co.city,
           rng.choice([c for c in CITIES[co.currency] if c != co.city]))
    s.figure(f"How many employees did {co.name} have as of {when1}?", h1, h0)
    s.figure(f"How many employees did {co.name} have as of {when0}?", h0, h1)
    s.figure(f"How many of {co.poss} employees are covered by collective bargaining agreements?",
             union, h1)
    s.figure(f"What percentage of {co.poss} workforce is based in {country}?", pct)
    big, small = (h1, h0) if h1.value > h0.value else (h0, h1)
    s.computed(f"By how many employees did {co.poss} headcount "
               f"{'increase' if h1.value > h0.value else 'decrease'} from {when0} to {when1}?",
               diff(big, small))
    s.computed(f"By what percentage did {co.poss} headcount change from {when0} to {when1}? "
               f"Round to one decimal place.", growth(h0, h1))
    s.computed(f"What percentage of {co.poss} employees as of {when1} were covered by collective "
               f"bargaining agreements, to one decimal?", share(union, [h1]))
    return s.finish("workforce", context)


def tpl_dividend(rng: random.Random) -> Scenario:
    """Capital-allocation note: dividend increase, payment dates, buyback."""
    co = make_company(rng)
    s = Scene(co)
    y = co.year
    d0 = co.cents(rng.randint(5, 140))
    d1 = d0.like(d0.value + rng.randint(1, 12))
    shares = Amount(rng.randint(5, 250), suffix=" million shares", decimals=1)
    buyback = co.money(rng.randint(40, 3000))
    month = rng.randint(1, 10)
    declared = date_text(y, month, rng.randint(1, 10))
    record = date_text(y, month + 1, rng.randint(1, 14))
    payable = date_text(y, month + 2, rng.randint(1, 28))
    if rng.random() < 0.5:
        context = (
            f"Capital allocation. On {declared}, the Board of Directors of {co.name} declared a "
            f"quarterly cash dividend of {s.show(d1)} per share, up from {s.show(d0)} per share "
            f"in the prior quarter. The dividend is payable on {payable} to shareholders of record "
            f"as of {record}. During fiscal {y}, the company repurchased {s.show(shares)} of "
            f"common stock for {s.show(buyback)}.")
    else:
        context = (
            f"{co.name} raised its quarterly dividend to {s.show(d1)} per share from {s.show(d0)}, "
            f"the board announced on {declared}. The dividend will be paid on {payable} to "
            f"holders of record at the close of business on {record}. In fiscal {y}, {co.name} "
            f"bought back {s.show(shares)} for a total of {s.show(buyback)}.")
    s.span(f"On what date is {co.poss} new quarterly dividend payable?", payable, record)
    s.span(f"What is the record date for {co.poss} new quarterly dividend?", record, payable)
    s.span(f"On what date was {co.poss} dividend increase announced?", declared, payable)
    s.figure(f"What is {co.poss} new quarterly dividend per share?", d1, d0)
    s.figure(f"What was {co.poss} quarterly dividend per share before the increase?", d0, d1)
    s.figure(f"How much did {co.name} spend on share repurchases in fiscal {y}?", buyback)
    s.figure(f"How many shares did {co.name} repurchase in fiscal {y}?", shares)
    s.computed(f"By how much per share did {co.name} increase its quarterly dividend?",
               diff(d1, d0))
    s.computed(f"By what percentage did {co.name} raise its quarterly dividend? Round to one "
               f"decimal place.", growth(d0, d1))
    s.computed(f"What annual dividend per share does the new quarterly rate imply (four quarterly "
               f"payments)?", combo([(1, d1)], mul=4, wrong=(d0.like(4 * d0.value).text,)))
    return s.finish("dividend", context)


def tpl_quarterly_table(rng: random.Random) -> Scenario:
    """Four-quarter table of revenue and operating income."""
    co = make_company(rng)
    s = Scene(co)
    y = co.year
    base = rng.randint(100, 2500)
    revenue = [co.money_short(vary(rng, base, -150, 150, 5)) for _ in range(4)]
    op_inc = [co.money_short(part(rng, r.value, 40, 240)) for r in revenue]
    net_inc = [co.money_short(part(rng, o.value, 450, 800)) for o in op_inc]
    labels = ["Q1", "Q2", "Q3", "Q4"]
    header = pick(rng, f"{co.name} - quarterly results, fiscal {y} (unaudited)",
                  f"Unaudited quarterly financial data for fiscal {y}, {co.name}")
    rows = [f"{l} | {s.show(r)} | {s.show(o)} | {s.show(n)}"
            for l, r, o, n in zip(labels, revenue, op_inc, net_inc)]
    context = "\n".join([header, "Quarter | Revenue | Operating income | Net income"] + rows)
    by_rev = sorted(range(4), key=lambda i: revenue[i].value)
    by_op = sorted(range(4), key=lambda i: op_inc[i].value)
    s.span(f"In which quarter of fiscal {y} did {co.name} record its highest revenue?",
           labels[by_rev[3]], labels[by_rev[2]])
    s.span(f"Which quarter of fiscal {y} had the lowest operating income?",
           labels[by_op[0]], labels[by_op[1]])
    s.span(f"Which quarter of fiscal {y} had the lowest revenue?", labels[by_rev[0]],
           labels[by_rev[1]])
    i = rng.randrange(4)
    s.figure(f"What was {co.poss} revenue in {labels[i]} of fiscal {y}?", revenue[i],
             revenue[(i + 1) % 4], op_inc[i])
    j = rng.randrange(4)
    s.figure(f"What operating income did {co.name} report in {labels[j]} of fiscal {y}?", op_inc[j],
             op_inc[(j + 1) % 4], revenue[j])
    s.computed(f"What was {co.poss} total revenue for fiscal {y} (sum of the four quarters)?",
               combo([(1, r) for r in revenue]))
    half = rng.choice([(0, 1, "first"), (2, 3, "second")])
    s.computed(f"What was {co.poss} revenue in the {half[2]} half of fiscal {y} "
               f"({labels[half[0]]} plus {labels[half[1]]})?",
               combo([(1, revenue[half[0]]), (1, revenue[half[1]])]))
    s.computed(f"By what percentage did revenue change from Q3 to Q4 of fiscal {y}? Round to "
               f"one decimal.", growth(revenue[2], revenue[3]))
    k = rng.randrange(4)
    s.computed(f"What was the operating margin in {labels[k]} of fiscal {y}, in percent to one "
               f"decimal?", ratio([(1, op_inc[k])], [(1, revenue[k])]))
    s.computed(f"What was {co.poss} total operating income for fiscal {y}?",
               combo([(1, o) for o in op_inc]))
    n = rng.randrange(4)
    s.figure(f"What net income did {co.name} report in {labels[n]} of fiscal {y}?", net_inc[n],
             net_inc[(n + 1) % 4], op_inc[n])
    s.computed(f"What was {co.poss} net margin in {labels[n]} of fiscal {y}, in percent to one "
               f"decimal?", ratio([(1, net_inc[n])], [(1, revenue[n])],
                                  (fmt_tenths(pct_tenths(op_inc[n].value, revenue[n].value)),)))
    return s.finish("quarterly_table", context)


def tpl_bank(rng: random.Random) -> Scenario:
    """Bank annual results: net interest income, fees, provisions, loans, deposits."""
    co = make_company(rng, "banking")
    s = Scene(co)
    y0, y1 = co.year - 1, co.year
    nii0 = co.money(rng.randint(150, 3000))
    nii1 = co.money(vary(rng, nii0.value, -80, 180))
    nonii = co.money(part(rng, nii1.value, 200, 480))
    prov = co.money(part(rng, nii1.value, 30, 160))
    loans = co.money(nii1.value * rng.randint(15, 26))
    deposits = co.money(loans.value * 100 // rng.randint(68, 97))
    branches = Amount(rng.randint(18, 420), suffix=" branches")
    state = rng.choice(US_STATES)
    driver = rng.choice(co.segments)
    verb = up_down(nii1.value, nii0.value, "rose", "declined")
    context = (
        f"{co.name} reported net interest income of {s.show(nii1)} for {y1}, which {verb} from "
        f"{s.show(nii0)} in {y0}. Noninterest income was {s.show(nonii)}, and the provision for "
        f"credit losses was {s.show(prov)}. At year-end, total loans stood at {s.show(loans)} and "
        f"total deposits at {s.show(deposits)}. {driver} was the largest contributor to loan "
        f"growth. The bank operates {s.show(branches)} across {state}.")
    s.span(f"In which state does {co.name} operate its branches?", state,
           rng.choice([x for x in US_STATES if x != state]))
    s.span(f"Which business was the largest contributor to {co.poss} loan growth?", driver,
           rng.choice([x for x in co.segments if x != driver]))
    s.figure(f"What was {co.poss} provision for credit losses in {y1}?", prov, nonii)
    s.figure(f"What were {co.poss} total deposits at year-end {y1}?", deposits, loans)
    s.figure(f"How many branches does {co.name} operate?", branches)
    s.figure(f"What was {co.poss} net interest income in {y0}?", nii0, nii1)
    s.computed(f"What was {co.poss} total revenue in {y1}, defined as net interest income plus "
               f"noninterest income?", combo([(1, nii1), (1, nonii)]))
    s.computed(f"What was {co.poss} loan-to-deposit ratio at year-end {y1}, in percent to one "
               f"decimal?", ratio([(1, loans)], [(1, deposits)],
                                  (fmt_tenths(pct_tenths(deposits.value, loans.value)),)))
    s.computed(f"By what percentage did {co.poss} net interest income change from {y0} to {y1}? "
               f"Round to one decimal.", growth(nii0, nii1))
    s.computed(f"How much larger were total deposits than total loans at year-end {y1}?",
               diff(deposits, loans))
    return s.finish("bank", context)


def tpl_energy(rng: random.Random) -> Scenario:
    """Upstream energy operations update: production, prices, capex, reserves."""
    co = make_company(rng, "energy")
    s = Scene(co)
    y0, y1 = co.year - 1, co.year
    p0 = Amount(rng.randint(200, 4000) * 100, suffix=" boe/d")
    p1 = p0.like(vary(rng, p0.value // 100, -100, 200) * 100)
    price0 = co.cents(rng.randint(4500, 9800))
    price = price0.like(vary(rng, price0.value, -250, 250, 10))
    loe = Amount(rng.randint(550, 1900), co.currency, " per boe", 2)
    capex = co.money(rng.randint(120, 4500))
    reserves = Amount(rng.randint(40, 2400), suffix=" million boe")
    basin = rng.choice(BASINS)
    context = (
        f"Operations update. {co.name} averaged production of {s.show(p1)} in {y1}, compared with "
        f"{s.show(p0)} in {y0}. The average realized oil price was {s.show(price)} per barrel "
        f"({s.show(price0)} in {y0}), and "
        f"lease operating expense was {s.show(loe)}. Capital expenditures totaled {s.show(capex)}, "
        f"and proved reserves at year-end were {s.show(reserves)}. Most drilling activity was "
        f"concentrated in the {basin}.")
    s.span(f"Where was most of {co.poss} drilling activity concentrated in {y1}?", basin,
           rng.choice([b for b in BASINS if b != basin]))
    s.figure(f"What was {co.poss} average realized oil price in {y1}?", price, price0, loe)
    s.figure(f"What was {co.poss} lease operating expense per barrel of oil equivalent?", loe,
             price)
    s.figure(f"How much did {co.name} spend on capital expenditures in {y1}?", capex)
    s.figure(f"What were {co.poss} proved reserves at year-end {y1}?", reserves)
    s.figure(f"What was {co.poss} average production in {y0}?", p0, p1)
    s.computed(f"By what percentage did {co.poss} average production change from {y0} to {y1}? "
               f"Round to one decimal.", growth(p0, p1))
    big, small = (p1, p0) if p1.value > p0.value else (p0, p1)
    s.computed(f"By how much did {co.poss} average daily production "
               f"{'increase' if p1.value > p0.value else 'decrease'} from {y0} to {y1}?",
               diff(big, small))
    big, small = (price, price0) if price.value > price0.value else (price0, price)
    s.computed(f"By how much per barrel did {co.poss} average realized oil price "
               f"{'rise' if price.value > price0.value else 'fall'} from {y0} to {y1}?",
               diff(big, small))
    return s.finish("energy", context)


def tpl_credit_facility(rng: random.Random) -> Scenario:
    """Liquidity note on a revolving credit facility."""
    co = make_company(rng)
    s = Scene(co)
    y = co.year
    facility = co.money(rng.choice([400, 500, 600, 750, 1000, 1250, 1500, 2000, 2500]))
    drawn = co.money(part(rng, facility.value, 20, 650))
    lcs = co.money(part(rng, facility.value, 5, 60))
    cash = co.money(rng.randint(30, 2200))
    agent = f"{rng.choice(NAME_HEADS)} {rng.choice(NAME_TAILS)} Bank"
    maturity = str(y + rng.randint(3, 6))
    signed = date_text(y, rng.randint(1, 6), rng.randint(1, 28))
    as_of = date_text(y, 12, 31)
    if rng.random() < 0.5:
        context = (
            f"Liquidity and capital resources. On {signed}, {co.name} entered into a {s.show(facility)} "
            f"senior unsecured revolving credit facility maturing in {maturity}, with {agent} as "
            f"administrative agent. As of {as_of}, {s.show(drawn)} was outstanding under the facility "
            f"and {s.show(lcs)} of letters of credit had been issued. Cash and cash equivalents "
            f"totaled {s.show(cash)}.")
    else:
        context = (
            f"Credit facility. {co.name} maintains a {s.show(facility)} revolving credit facility that "
            f"matures in {maturity}; {agent} serves as administrative agent. Borrowings outstanding "
            f"were {s.show(drawn)} at {as_of}, and letters of credit issued under the facility "
            f"totaled {s.show(lcs)}. The company held {s.show(cash)} of cash and cash equivalents "
            f"at that date.")
    s.span(f"Which bank is the administrative agent for {co.poss} revolving credit facility?",
           agent, f"{rng.choice(NAME_HEADS)} {rng.choice(NAME_TAILS)} Trust")
    s.span(f"In what year does {co.poss} revolving credit facility mature?", maturity, str(y))
    s.figure(f"What is the total size of {co.poss} revolving credit facility?", facility, drawn)
    s.figure(f"How much was outstanding under {co.poss} revolving credit facility as of {as_of}?",
             drawn, lcs, facility)
    s.figure(f"How much cash and cash equivalents did {co.name} hold as of {as_of}?", cash)
    s.figure(f"What amount of letters of credit had been issued under the facility?", lcs, drawn)
    s.computed(f"How much borrowing capacity remained available under the facility, net of "
               f"borrowings and letters of credit?", combo([(1, facility), (-1, drawn), (-1, lcs)],
                                                          wrong=(diff(facility, drawn).answer,)))
    s.computed(f"What percentage of the facility was drawn as borrowings, to one decimal?",
               ratio([(1, drawn)], [(1, facility)]))
    s.computed(f"What was {co.poss} total liquidity, defined as cash plus available capacity under "
               f"the facility (net of borrowings and letters of credit)?",
               combo([(1, cash), (1, facility), (-1, drawn), (-1, lcs)]))
    return s.finish("credit_facility", context)


def tpl_cash_flow(rng: random.Random) -> Scenario:
    """Cash-flow discussion with a free-cash-flow definition."""
    co = make_company(rng)
    s = Scene(co)
    y0, y1 = co.year - 1, co.year
    ocf0 = co.money(rng.randint(90, 5000))
    ocf1 = co.money(vary(rng, ocf0.value, -150, 250))
    capex = co.money(part(rng, ocf1.value, 150, 700))
    financing = co.money(part(rng, ocf1.value, 200, 800))
    dividends = co.money(part(rng, financing.value, 150, 600))
    use = rng.choice(FINANCING_USES)
    definition = "operating cash flow less capital expenditures"
    context = (
        f"Cash flows. For fiscal {y1}, net cash provided by operating activities was {s.show(ocf1)}, "
        f"compared with {s.show(ocf0)} in fiscal {y0}. Capital expenditures were {s.show(capex)}. "
        f"Net cash used in financing activities was {s.show(financing)}, including "
        f"{s.show(dividends)} of dividends paid; the remainder related mainly to {use}. "
        f"{co.name} defines free cash flow as {definition}.")
    s.span(f"How does {co.name} define free cash flow?", definition,
           "operating cash flow less dividends paid")
    s.span(f"Apart from dividends, what did {co.poss} financing outflows mainly relate to in "
           f"fiscal {y1}?", use, rng.choice([u for u in FINANCING_USES if u != use]))
    s.figure(f"How much did {co.name} pay in dividends in fiscal {y1}?", dividends, financing)
    s.figure(f"What was {co.poss} net cash used in financing activities in fiscal {y1}?",
             financing, dividends)
    s.figure(f"What was {co.poss} net cash provided by operating activities in fiscal {y0}?",
             ocf0, ocf1)
    s.figure(f"How much were {co.poss} capital expenditures in fiscal {y1}?", capex)
    s.computed(f"What was {co.poss} free cash flow for fiscal {y1}, using the company's "
               f"definition?", diff(ocf1, capex, (diff(ocf1, dividends).answer,)))
    s.computed(f"By what percentage did operating cash flow change from fiscal {y0} to fiscal {y1}? "
               f"Round to one decimal.", growth(ocf0, ocf1))
    s.computed(f"What were capital expenditures as a percentage of operating cash flow in fiscal "
               f"{y1}, to one decimal?", share(capex, [ocf1]))
    s.computed(f"How much of the net cash used in financing activities was not dividends?",
               diff(financing, dividends))
    return s.finish("cash_flow", context)


def tpl_guidance(rng: random.Random) -> Scenario:
    """Forward-looking outlook with a revenue range."""
    co = make_company(rng)
    s = Scene(co)
    y1, y2 = co.year, co.year + 1
    rev = co.money(rng.randint(200, 8000))
    lo = co.money(vary(rng, rev.value, -50, 150, 5))
    hi = co.money(lo.value + 2 * max(1, part(rng, lo.value, 10, 40)))
    if lo.value == rev.value:
        raise Retry
    op_margin = Amount(rng.randint(6, 32), suffix="%")
    capex = co.money(part(rng, rev.value, 30, 120))
    time = rng.choice(CALL_TIMES)
    if rng.random() < 0.5:
        context = (
            f"Outlook. For fiscal {y2}, {co.name} expects revenue in the range of {s.show(lo)} to "
            f"{s.show(hi)} and an adjusted operating margin of approximately {s.show(op_margin)}. "
            f"Fiscal {y1} revenue was {s.show(rev)}. The company also expects capital expenditures "
            f"of about {s.show(capex)}. {co.cfo}, chief financial officer, will discuss the outlook "
            f"on a conference call at {time} Eastern Time.")
    else:
        context = (
            f"{co.name} issued guidance for fiscal {y2}: revenue of {s.show(lo)} to {s.show(hi)}, "
            f"compared with {s.show(rev)} in fiscal {y1}, an adjusted operating margin near "
            f"{s.show(op_margin)}, and capital spending of roughly {s.show(capex)}. Management, "
            f"including chief financial officer {co.cfo}, will host a call at {time} Eastern Time.")
    s.span(f"Who is {co.poss} chief financial officer?", co.cfo, co.ceo)
    s.span(f"At what time (Eastern Time) will {co.name} hold its outlook call?", time,
           rng.choice([t for t in CALL_TIMES if t != time]))
    s.span(f"Which fiscal year does {co.poss} outlook cover?", str(y2), str(y1))
    s.figure(f"What is the low end of {co.poss} fiscal {y2} revenue guidance?", lo, hi, rev)
    s.figure(f"What is the high end of {co.poss} fiscal {y2} revenue guidance?", hi, lo)
    s.figure(f"What adjusted operating margin does {co.name} expect for fiscal {y2}?", op_margin)
    s.figure(f"What was {co.poss} revenue in fiscal {y1}?", rev, lo)
    s.computed(f"What is the midpoint of {co.poss} fiscal {y2} revenue guidance?",
               combo([(1, lo), (1, hi)], div=2, wrong=(combo([(1, lo), (1, hi)]).answer,)))
    s.computed(f"How wide is {co.poss} fiscal {y2} revenue guidance range (high end minus low end)?",
               diff(hi, lo))
    s.computed(f"What revenue growth does the midpoint of the fiscal {y2} guidance imply versus "
               f"fiscal {y1}, in percent to one decimal?",
               ratio([(1, lo), (1, hi), (-2, rev)], [(2, rev)],
                     (fmt_tenths(pct_tenths(lo.value - rev.value, rev.value)),)))
    return s.finish("guidance", context)


def tpl_retail_stores(rng: random.Random) -> Scenario:
    """Retail store-count and comparable-sales paragraph."""
    co = make_company(rng, "retail")
    s = Scene(co)
    y = co.year
    opened = Amount(rng.randint(8, 140), suffix=" stores")
    closed = opened.like(rng.randint(2, 60))
    end = opened.like(rng.randint(180, 2600))
    states = Amount(rng.randint(9, 48), suffix=" states")
    comp = Amount(rng.choice([-1, 1]) * rng.randint(3, 95), suffix="%", decimals=1)
    sales = co.money(rng.randint(400, 12000))
    ecom = co.money(part(rng, sales.value, 60, 380))
    market = rng.choice(US_STATES)
    comp_phrase = (f"increased {s.show(comp)}" if comp.value > 0
                   else f"decreased {s.show(comp.like(-comp.value))}")
    context = (
        f"Store footprint. During fiscal {y}, {co.name} opened {s.show(opened)} and closed "
        f"{s.show(closed)}, ending the year with {s.show(end)} in {s.show(states)}. {market} remained "
        f"our largest market by sales. Comparable sales {comp_phrase}, and e-commerce sales reached "
        f"{s.show(ecom)} on total net sales of {s.show(sales)}.")
    comp_text = comp.text if comp.value > 0 else comp.like(-comp.value).text
    s.span(f"Which state was {co.poss} largest market by sales in fiscal {y}?", market,
           rng.choice([x for x in US_STATES if x != market]))
    s.span(f"Did {co.poss} comparable sales increase or decrease in fiscal {y}?",
           "increased" if comp.value > 0 else "decreased",
           "decreased" if comp.value > 0 else "increased")
    s.figure(f"How many stores did {co.name} open in fiscal {y}?", opened, closed)
    s.figure(f"How many stores did {co.name} operate at the end of fiscal {y}?", end, opened)
    s.figure(f"In how many states did {co.name} operate stores at the end of fiscal {y}?", states)
    s.figure(f"What were {co.poss} e-commerce sales in fiscal {y}?", ecom, sales)
    s.items.append(Item("figure", f"By how much did {co.poss} comparable sales "
                        f"{'increase' if comp.value > 0 else 'decrease'} in fiscal {y}?",
                        comp_text, ()))
    s.computed(f"How many stores did {co.name} operate at the beginning of fiscal {y}?",
               combo([(1, end), (-1, opened), (1, closed)],
                     wrong=(end.like(end.value + opened.value - closed.value).text,)))
    s.computed(f"What was {co.poss} net change in store count during fiscal {y} (openings minus "
               f"closings)?", diff(opened, closed))
    s.computed(f"What share of {co.poss} total net sales came from e-commerce, in percent to one "
               f"decimal?", share(ecom, [sales]))
    return s.finish("retail_stores", context)


def tpl_saas_kpis(rng: random.Random) -> Scenario:
    """Software key metrics: ARR, large customers, retention, revenue mix."""
    co = make_company(rng, "software")
    s = Scene(co)
    y0, y1 = co.year - 1, co.year
    arr0 = co.money(rng.randint(60, 3000))
    arr1 = co.money(vary(rng, arr0.value, -40, 450))
    big0 = Amount(rng.randint(80, 3000), suffix=" customers")
    big1 = big0.like(vary(rng, big0.value, 20, 400))
    nrr = Amount(rng.randint(96, 135), suffix="%")
    sub = co.money(part(rng, arr1.value, 820, 990))
    services = co.money(part(rng, sub.value, 40, 260))
    product = f"{rng.choice(PRODUCT_HEADS)} {rng.choice(PRODUCT_TAILS)}"
    context = (
        f"Key metrics. {co.name} ended fiscal {y1} with annual recurring revenue (ARR) of "
        f"{s.show(arr1)}, compared with {s.show(arr0)} a year earlier. Customers with ARR above "
        f"$100,000 grew to {s.show(big1)} from {s.show(big0)}. Dollar-based net retention rate was "
        f"{s.show(nrr)}. Subscription revenue was {s.show(sub)} and professional services revenue "
        f"was {s.show(services)}. The flagship {product} platform accounted for most new bookings.")
    s.span(f"Which {co.name} platform accounted for most new bookings in fiscal {y1}?", product,
           f"{rng.choice(PRODUCT_HEADS)} {rng.choice(PRODUCT_TAILS)}")
    s.span(f"Which metric was {nrr.text} for {co.name} in fiscal {y1}?",
           "Dollar-based net retention rate", "Gross margin")
    s.figure(f"What was {co.poss} dollar-based net retention rate in fiscal {y1}?", nrr)
    s.figure(f"What was {co.poss} subscription revenue in fiscal {y1}?", sub, services, arr1)
    s.figure(f"How many customers with ARR above $100,000 did {co.name} have at the end of fiscal "
             f"{y1}?", big1, big0)
    s.figure(f"What was {co.poss} ARR at the end of fiscal {y0}?", arr0, arr1)
    s.computed(f"By what percentage did {co.poss} ARR grow from fiscal {y0} to fiscal {y1}? "
               f"Round to one decimal.", growth(arr0, arr1))
    s.computed(f"What was {co.poss} total revenue in fiscal {y1} (subscription plus professional "
               f"services)?", combo([(1, sub), (1, services)]))
    s.computed(f"What share of {co.poss} fiscal {y1} revenue (subscription plus professional "
               f"services) came from subscriptions, to one decimal?", share(sub, [sub, services]))
    s.computed(f"How many customers with ARR above $100,000 did {co.name} add during fiscal {y1}?",
               diff(big1, big0))
    return s.finish("saas_kpis", context)


def tpl_telecom(rng: random.Random) -> Scenario:
    """Wireless carrier quarterly operating metrics."""
    co = make_company(rng, "telecom")
    s = Scene(co)
    q = rng.randint(1, 4)
    ordinal = ORDINALS[q - 1]
    fy = co.year
    adds = Amount(rng.randint(5, 400) * 1000, suffix=" subscribers")
    base = adds.like(rng.randint(800, 30000) * 1000)
    churn = Amount(rng.randint(62, 185), suffix="%", decimals=2)
    arpu = co.cents(rng.randint(3500, 7200))
    service = co.money(rng.randint(400, 9000))
    equipment = co.money(part(rng, service.value, 80, 350))
    city = rng.choice([c for c in CITIES[co.currency]])
    context = (
        f"In the {ordinal} quarter of fiscal {fy}, {co.name} reported postpaid phone net additions "
        f"of {s.show(adds)}, bringing its postpaid phone base to {s.show(base)}. Postpaid phone "
        f"churn was {s.show(churn)} and average revenue per user (ARPU) was {s.show(arpu)}. Service "
        f"revenue was {s.show(service)}, while equipment revenue was {s.show(equipment)}. During the "
        f"quarter the company launched fixed wireless home internet in {city}.")
    s.span(f"In which city did {co.name} launch fixed wireless home internet?", city,
           rng.choice([c for c in CITIES[co.currency] if c != city]))
    s.span(f"Which quarter of fiscal {fy} do {co.poss} reported metrics cover (first, second, "
           f"third or fourth)?", ordinal, ORDINALS[q % 4])
    s.figure(f"What was {co.poss} postpaid phone churn in the {ordinal} quarter?", churn)
    s.figure(f"What was {co.poss} average revenue per user (ARPU) in the quarter?", arpu)
    s.figure(f"How many postpaid phone net additions did {co.name} report?", adds, base)
    s.figure(f"What was {co.poss} equipment revenue in the {ordinal} quarter?", equipment, service)
    s.computed(f"What was {co.poss} combined service and equipment revenue in the {ordinal} quarter?",
               combo([(1, service), (1, equipment)]))
    s.computed(f"How many postpaid phone subscribers did {co.name} have at the start of the quarter?",
               diff(base, adds))
    s.computed(f"What percentage of combined service and equipment revenue was service revenue, to "
               f"one decimal?", share(service, [service, equipment]))
    return s.finish("telecom", context)


def tpl_pharma(rng: random.Random) -> Scenario:
    """Biopharma results centred on a lead product and pipeline trial."""
    co = make_company(rng, "healthcare")
    s = Scene(co)
    y0, y1 = co.year - 1, co.year
    drug = rng.choice(DRUG_HEADS) + rng.choice(DRUG_TAILS)
    indication = rng.choice(INDICATIONS)
    trial = rng.choice(TRIAL_NAMES)
    r0 = co.money(rng.randint(40, 2500))
    r1 = co.money(vary(rng, r0.value, -60, 600))
    total = co.money(r1.value + rng.randint(20, 2500))
    rd = co.money(part(rng, total.value, 150, 450))
    sga = co.money(part(rng, total.value, 120, 380))
    context = (
        f"{co.name} reported net product sales of {drug}, its lead therapy for {indication}, of "
        f"{s.show(r1)} in fiscal {y1}, compared with {s.show(r0)} in fiscal {y0}. Total revenue was "
        f"{s.show(total)}. Research and development expenses were {s.show(rd)}, and selling, general "
        f"and administrative expenses were {s.show(sga)}. Enrollment in the Phase 3 {trial} trial "
        f"was completed during the year.")
    s.span(f"What is the name of {co.poss} lead therapy?", drug,
           rng.choice(DRUG_HEADS) + rng.choice(DRUG_TAILS))
    s.span(f"Which condition does {drug} treat?", indication,
           rng.choice([x for x in INDICATIONS if x != indication]))
    s.span(f"Which Phase 3 trial completed enrollment during fiscal {y1}?", trial,
           rng.choice([x for x in TRIAL_NAMES if x != trial]))
    s.figure(f"What were {co.poss} research and development expenses in fiscal {y1}?", rd, sga)
    s.figure(f"What were net product sales of {drug} in fiscal {y0}?", r0, r1)
    s.figure(f"What was {co.poss} total revenue in fiscal {y1}?", total, r1)
    s.figure(f"How much were {co.poss} selling, general and administrative expenses in fiscal "
             f"{y1}?", sga, rd)
    s.computed(f"By what percentage did {drug} net product sales change from fiscal {y0} to fiscal "
               f"{y1}? Round to one decimal.", growth(r0, r1))
    s.computed(f"What were research and development expenses as a percentage of total revenue in "
               f"fiscal {y1}, to one decimal?", share(rd, [total]))
    s.computed(f"How much of {co.poss} fiscal {y1} total revenue came from sources other than "
               f"{drug}?", diff(total, r1))
    s.computed(f"What were {co.poss} combined research and development and SG&A expenses in "
               f"fiscal {y1}?", combo([(1, rd), (1, sga)]))
    return s.finish("pharma", context)


def tpl_backlog(rng: random.Random) -> Scenario:
    """Industrial orders, backlog and plant disclosure."""
    co = make_company(rng, rng.choice(["manufacturing", "logistics", "energy", "telecom"]))
    s = Scene(co)
    y0, y1 = co.year - 1, co.year
    orders = co.money(rng.randint(200, 7000))
    sales = co.money(part(rng, orders.value, 800, 1200))
    if sales.value == orders.value:
        raise Retry
    bl0 = co.money(rng.randint(150, 9000))
    bl1 = co.money(bl0.value + orders.value - sales.value)
    if bl1.value <= 0:
        raise Retry
    plant_city = rng.choice(CITIES[co.currency])
    seg = co.segments[0]
    context = (
        f"Orders and backlog. {co.name} received orders of {s.show(orders)} in fiscal {y1} and "
        f"recorded sales of {s.show(sales)}. Backlog at the end of fiscal {y1} was {s.show(bl1)}, "
        f"compared with {s.show(bl0)} at the end of fiscal {y0}. Demand was strongest in the {seg} "
        f"segment, and the company began construction of a new plant in {plant_city}.")
    s.span(f"In which segment was {co.poss} demand strongest in fiscal {y1}?", seg, co.segments[1])
    s.span(f"Where is {co.name} building a new plant?", plant_city,
           rng.choice([c for c in CITIES[co.currency] if c != plant_city]))
    s.figure(f"What was {co.poss} backlog at the end of fiscal {y0}?", bl0, bl1)
    s.figure(f"What was the value of orders {co.name} received in fiscal {y1}?", orders, sales)
    s.figure(f"What were {co.poss} sales in fiscal {y1}?", sales, orders)
    inverted = fmt_tenths(pct_tenths(sales.value, orders.value))  # sales / orders
    s.computed(f"What was {co.poss} book-to-bill ratio in fiscal {y1} (orders divided by sales), "
               f"expressed in percent to one decimal?",
               ratio([(1, orders)], [(1, sales)], (inverted,)))
    s.computed(f"By what percentage did {co.poss} backlog change during fiscal {y1}? Round to one "
               f"decimal.", growth(bl0, bl1))
    grew = bl1.value > bl0.value
    big, small = (bl1, bl0) if grew else (bl0, bl1)
    s.computed(f"By how much did {co.poss} backlog {'increase' if grew else 'decrease'} "
               f"during fiscal {y1}?", diff(big, small))
    return s.finish("backlog", context)


TEMPLATES: list[Callable[[random.Random], Scenario]] = [
    tpl_mdna, tpl_selected_table, tpl_press_release, tpl_segments, tpl_balance_sheet,
    tpl_workforce, tpl_dividend, tpl_quarterly_table, tpl_bank, tpl_energy,
    tpl_credit_facility, tpl_cash_flow, tpl_guidance, tpl_retail_stores, tpl_saas_kpis,
    tpl_telecom, tpl_pharma, tpl_backlog,
]


# ---------------------------------------------------------------------------
# Validation of scenes and items
# ---------------------------------------------------------------------------

def validate_scenario(scenario: Scenario) -> None:
    """Raise Retry for unlucky draws, AssertionError for generator bugs."""
    context = scenario.context
    if not MIN_CONTEXT <= len(context) <= MAX_CONTEXT:
        raise Retry
    if len(set(scenario.figures)) != len(scenario.figures):
        raise Retry
    if any(occurrences(text, context) != 1 for text in scenario.figures):
        raise Retry
    kinds = {item.kind for item in scenario.items}
    assert kinds == set(KINDS), f"{scenario.template} lacks kinds: {set(KINDS) - kinds}"
    for item in scenario.items:
        verify_item(item, context)


def verify_item(item: Item, context: str) -> None:
    """Check one question/answer item against its context."""
    answer = item.answer
    assert answer and answer == answer.strip(), f"bad answer {answer!r}"
    assert item.question.endswith("?") or item.question.endswith("."), item.question
    if item.kind == "span":
        assert answer in context, f"span {answer!r} not in context"
    elif item.kind == "figure":
        assert occurrences(answer, context) == 1, f"figure {answer!r} not exactly once"
    else:
        assert item.check is not None
        recomputed = recompute(item.check, context)
        assert recomputed == answer, f"computed {answer!r} != recomputed {recomputed!r}"
    assert answer not in item.wrong, f"wrong answers contain the answer {answer!r}"


def draw_scenario(rng: random.Random, template: Callable[[random.Random], Scenario]) -> Scenario:
    for _ in range(200):
        try:
            scenario = template(rng)
            validate_scenario(scenario)
            return scenario
        except Retry:
            continue
    raise RuntimeError(f"template {template.__name__} keeps producing invalid scenes")


def draw_items(seed: int, count: int) -> list[tuple[Scenario, Item]]:
    """count (scenario, item) pairs; kinds cycle so they are balanced and every
    template is asked every kind equally often."""
    rng = random.Random(seed)
    drawn: list[tuple[Scenario, Item]] = []
    seen: set[tuple[str, str]] = set()
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        template = TEMPLATES[(i // len(KINDS)) % len(TEMPLATES)]
        while True:
            scenario = draw_scenario(rng, template)
            item = rng.choice([it for it in scenario.items if it.kind == kind])
            key = (item.question, scenario.context)
            if key not in seen:
                seen.add(key)
                drawn.append((scenario, item))
                break
    return drawn


# ---------------------------------------------------------------------------
# Dataset builders
# ---------------------------------------------------------------------------

def build_finqa() -> list[dict]:
    pairs = draw_items(FINQA_SEED, FINQA_ROWS)
    random.Random(FINQA_SEED + 1).shuffle(pairs)
    return [
        {"id": f"finqa-{n:04d}", "question": item.question, "context": scenario.context,
         "answer": item.answer, "kind": item.kind}
        for n, (scenario, item) in enumerate(pairs, start=1)
    ]


UNSUPPORTED_SUFFIXES = [
    ", driven mainly by a one-time acquisition",
    ", which management expects to double next year",
    ", the highest level in the company's history",
    ", reflecting favorable currency movements",
]


def perturb_figure(answer: str, rng: random.Random) -> str:
    """A nearby but wrong number in the same format (for figures with no sibling)."""
    value, prefix, suffix, decimals = parse_figure(answer)
    scaled = int(value * 10 ** decimals)
    delta = max(1, abs(scaled) * rng.randint(8, 30) // 100)
    wrong = Amount(scaled + rng.choice([-1, 1]) * delta, prefix, suffix, decimals)
    if wrong.value <= 0:
        wrong = wrong.like(scaled + delta)
    return wrong.text


def choose_rejected(item: Item, rng: random.Random) -> str:
    """A plausible wrong answer: a confusable figure or span from the context,
    a mis-computed value, or an unsupported claim."""
    options = list(dict.fromkeys(w for w in item.wrong if w != item.answer))
    roll = rng.random()
    if roll < 0.08:
        return "The context does not provide this information."
    if roll < 0.16 and item.kind != "span":
        return item.answer + rng.choice(UNSUPPORTED_SUFFIXES)
    if not options:
        return perturb_figure(item.answer, rng)
    # Prefer the template's hand-picked confusion (listed first) half of the time.
    return options[0] if rng.random() < 0.5 else rng.choice(options)


def build_preferences() -> list[dict]:
    pairs = draw_items(PREF_SEED, PREF_ROWS)
    rng = random.Random(PREF_SEED + 1)
    rng.shuffle(pairs)
    rows = []
    for n, (scenario, item) in enumerate(pairs, start=1):
        rejected = choose_rejected(item, rng)
        assert rejected != item.answer
        rows.append({
            "id": f"finqa-pref-{n:04d}",
            "prompt": f"Context:\n{scenario.context}\n\nQuestion: {item.question}",
            "chosen": item.answer,
            "rejected": rejected,
        })
    return rows


# ---------------------------------------------------------------------------
# Headline sentiment (second task; deliberately different column names)
# ---------------------------------------------------------------------------

HEADLINE_INSTRUCTIONS = [
    "Classify the sentiment of this financial headline as positive, negative or neutral.",
    "Is the following financial news headline positive, negative, or neutral? Answer with one word.",
    "Label the sentiment of the headline below as positive, negative or neutral.",
    "Read the financial headline and state whether its sentiment is positive, negative or neutral.",
    "What is the market sentiment of this headline: positive, negative, or neutral?",
]

HEADLINE_TEMPLATES = {
    "positive": [
        "{co} beats {q} profit estimates as revenue climbs {pct}%",
        "{co} raises full-year {year} earnings guidance after strong {q} results",
        "{co} lifts quarterly dividend {pct}% to {div} a share",
        "{co} posts record {q} revenue of {amt}, topping forecasts",
        "{co} shares jump {pct}% after upbeat outlook",
        "{co} wins {amt} multi-year contract, shares rise",
        "{co} swings to {q} profit as margins widen",
        "{co} unveils {amt} share buyback on strong cash flow",
        "Analysts upgrade {co} to buy on improving demand",
        "{co} quarterly net income jumps {pct}% on robust orders",
        "{co} completes acquisition of {co2}, expects immediate boost to earnings",
        "{co} credit rating upgraded as debt falls",
        "{co} beats estimates and raises {year} revenue forecast",
        "{store_co} reports {pct}% rise in same-store sales, beating expectations",
    ],
    "negative": [
        "{co} misses {q} estimates, cuts full-year guidance",
        "{co} to cut {jobs} jobs as demand weakens",
        "{co} suspends dividend after surprise {q} loss",
        "{co} shares tumble {pct}% after profit warning",
        "{co} posts wider-than-expected {q} loss",
        "{co} slashes {year} revenue forecast on weak orders",
        "{goods_co} recalls {units} units over safety defect",
        "Analysts downgrade {co} to sell amid shrinking margins",
        "{co} quarterly revenue falls {pct}% as sales slump",
        "{co} takes {amt} writedown on failed expansion",
        "Regulators fine {co} {amt} over reporting failures",
        "{co} delays annual report, shares slide",
        "{co} cuts quarterly dividend by {pct}% to preserve cash",
        "{co} credit rating cut to junk on rising debt",
    ],
    "neutral": [
        "{co} to report {q} results on {date}",
        "{co} reports flat {q} revenue of {amt}",
        "{co} keeps quarterly dividend unchanged at {div} a share",
        "{co} {q} earnings in line with analyst estimates",
        "{co} appoints {person} to board of directors",
        "{co} to present at {conf} on {date}",
        "{co} files annual report for fiscal {year}",
        "{co} schedules annual shareholder meeting for {date}",
        "{co} relocates headquarters to {city}",
        "{co} names {person} chief financial officer",
        "{co} prices {amt} of senior notes due {later}",
        "{co} maintains {year} outlook as results meet expectations",
        "{co} sets date for investor day in {city}",
        "{store_co} reports {q} same-store sales unchanged from a year earlier",
    ],
}
CONFERENCES = ["Midwest Industrials Conference", "Global Technology Summit",
               "Healthcare Growth Forum", "Consumer Leaders Conference",
               "Energy Horizons Conference", "Financial Services Forum"]
QUARTER_WORDS = ["Q1", "Q2", "Q3", "Q4", "first-quarter", "second-quarter",
                 "third-quarter", "fourth-quarter"]


def headline_slots(rng: random.Random) -> dict[str, str]:
    co = make_company(rng)
    co2 = make_company(rng)
    year = rng.randint(2019, 2026)
    return {
        "co": co.name,
        "co2": co2.name,
        "store_co": make_company(rng, "retail").name,
        "goods_co": make_company(rng, rng.choice(["manufacturing", "food", "healthcare"])).name,
        "q": rng.choice(QUARTER_WORDS),
        "pct": str(rng.randint(3, 38)),
        "amt": Amount(rng.randint(20, 2500), "$", " million").text,
        "div": Amount(rng.randint(5, 160), "$", "", 2).text,
        "jobs": f"{rng.randint(2, 80) * 50:,}",
        "units": f"{rng.randint(5, 400) * 1000:,}",
        "year": str(year),
        "later": str(year + rng.randint(3, 10)),
        "date": f"{rng.choice(MONTHS)} {rng.randint(1, 28)}",
        "person": person(rng),
        "city": rng.choice(CITIES["$"] + CITIES["€"] + CITIES["£"]),
        "conf": rng.choice(CONFERENCES),
    }


def build_headlines() -> list[dict]:
    rng = random.Random(HEADLINE_SEED)
    labels = sorted(HEADLINE_TEMPLATES)
    rows, seen = [], set()
    for i in range(HEADLINE_ROWS):
        label = labels[i % len(labels)]
        while True:
            headline = rng.choice(HEADLINE_TEMPLATES[label]).format(**headline_slots(rng))
            if headline not in seen:
                seen.add(headline)
                break
        rows.append({"instruction": rng.choice(HEADLINE_INSTRUCTIONS),
                     "headline": headline, "label": label})
    rng.shuffle(rows)
    return [{"id": f"headline-{n:04d}", **row} for n, row in enumerate(rows, start=1)]


CHAT_SYSTEMS = [
    "You are a financial analyst. Answer with the exact figure or phrase only.",
    "Answer questions about the excerpt the user shares. Give only the figure or name asked for.",
    "You help investors read company reports. Reply with the answer alone, no sentence.",
]
CHAT_OPENINGS = [
    "Here is an excerpt from a company report:\n\n{context}\n\n{question}",
    "Context:\n{context}\n\nQuestion: {question}",
    "{context}\n\nBased on this excerpt: {question}",
]
CHAT_FOLLOW_UPS = ["{question}", "Next: {question}", "Thanks. {question}", "One more: {question}"]


def build_finchat(avoid_contexts: set[str]) -> list[dict]:
    """Conversations about one excerpt each: the first user turn shares it and asks a span or
    figure question, one or two follow-ups ask more (any kind, computed included), so every
    answer is derivable from the conversation. Some conversations open with a system turn."""
    rng = random.Random(FINCHAT_SEED)
    rows, seen = [], set(avoid_contexts)
    for n in range(1, FINCHAT_ROWS + 1):
        template = TEMPLATES[(n - 1) % len(TEMPLATES)]
        scenario = draw_scenario(rng, template)
        while scenario.context in seen:
            scenario = draw_scenario(rng, template)
        seen.add(scenario.context)
        first = rng.choice([it for it in scenario.items if it.kind != "computed"])
        rest = [it for it in scenario.items if it is not first and it.question != first.question]
        items = [first] + rng.sample(rest, rng.choice((1, 2)))
        turns = [{"role": "system", "content": rng.choice(CHAT_SYSTEMS)}] if rng.random() < 0.4 else []
        opening = rng.choice(CHAT_OPENINGS)
        for k, item in enumerate(items):
            text = (opening.format(context=scenario.context, question=item.question) if k == 0
                    else rng.choice(CHAT_FOLLOW_UPS).format(question=item.question))
            turns += [{"role": "user", "content": text}, {"role": "assistant", "content": item.answer}]
        rows.append({"id": f"finchat-{n:04d}", "messages": turns})
    return rows


# ---------------------------------------------------------------------------
# Output, --check and --stats
# ---------------------------------------------------------------------------

def to_jsonl(rows: list[dict]) -> bytes:
    lines = [json.dumps(row, ensure_ascii=False, sort_keys=True) for row in rows]
    return ("\n".join(lines) + "\n").encode("utf-8")


def build_all() -> dict[str, list[dict]]:
    finqa = build_finqa()
    prefs = build_preferences()
    headlines = build_headlines()
    check_datasets(finqa, prefs, headlines)
    finchat = build_finchat({r["context"] for r in finqa})
    check_finchat(finchat)
    return {FINQA_FILE: finqa, PREF_FILE: prefs, HEADLINE_FILE: headlines, FINCHAT_FILE: finchat}


def check_finchat(rows: list[dict]) -> None:
    """Conversations are well formed: an optional system turn, then user/assistant pairs (2-3),
    non-empty text, unique conversations."""
    assert len({json.dumps(r["messages"], sort_keys=True) for r in rows}) == len(rows)
    for row in rows:
        turns = row["messages"]
        body = turns[1:] if turns[0]["role"] == "system" else turns
        assert [t["role"] for t in body] == ["user", "assistant"] * (len(body) // 2) and 2 <= len(body) // 2 <= 3
        assert all(t["content"].strip() for t in turns)


def check_datasets(finqa: list[dict], prefs: list[dict], headlines: list[dict]) -> None:
    """Cross-file invariants."""
    assert len({(r["question"], r["context"]) for r in finqa}) == len(finqa)
    assert len({r["prompt"] for r in prefs}) == len(prefs)
    qa_contexts = {r["context"] for r in finqa}
    for row in prefs:
        context = row["prompt"].split("\n\nQuestion: ")[0].removeprefix("Context:\n")
        assert context not in qa_contexts, "preference context duplicates a QA context"
        assert row["chosen"] != row["rejected"]
    assert len({r["headline"] for r in headlines}) == len(headlines)
    for rows, key in ((finqa, "kind"), (headlines, "label")):
        counts = [sum(r[key] == v for r in rows) for v in {r[key] for r in rows}]
        assert max(counts) - min(counts) <= 1, f"unbalanced {key}: {counts}"


def print_stats(datasets: dict[str, list[dict]]) -> None:
    finqa = datasets[FINQA_FILE]
    lengths = [len(r["context"]) for r in finqa]
    print(f"{FINQA_FILE}: {len(finqa)} rows, context chars min/mean/max = "
          f"{min(lengths)}/{sum(lengths) / len(lengths):.1f}/{max(lengths)}")
    for kind in KINDS:
        print(f"  kind={kind}: {sum(r['kind'] == kind for r in finqa)}")
    prefs = datasets[PREF_FILE]
    plens = [len(r["prompt"]) for r in prefs]
    print(f"{PREF_FILE}: {len(prefs)} rows, prompt chars min/mean/max = "
          f"{min(plens)}/{sum(plens) / len(plens):.1f}/{max(plens)}")
    heads = datasets[HEADLINE_FILE]
    print(f"{HEADLINE_FILE}: {len(heads)} rows")
    for label in sorted(HEADLINE_TEMPLATES):
        print(f"  label={label}: {sum(r['label'] == label for r in heads)}")
    chats = datasets[FINCHAT_FILE]
    pairs = [sum(t["role"] == "user" for t in r["messages"]) for r in chats]
    chars = [sum(len(t["content"]) for t in r["messages"]) for r in chats]
    print(f"{FINCHAT_FILE}: {len(chats)} conversations, {sum(pairs)} user turns "
          f"({pairs.count(2)} with 2, {pairs.count(3)} with 3), "
          f"{sum(r['messages'][0]['role'] == 'system' for r in chats)} with a system turn, "
          f"chars min/mean/max = {min(chars)}/{sum(chars) / len(chars):.1f}/{max(chars)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="regenerate in memory and fail if a committed file differs")
    parser.add_argument("--stats", action="store_true", help="print row counts and lengths")
    args = parser.parse_args(argv)
    datasets = build_all()
    if args.stats:
        print_stats(datasets)
    if args.check:
        stale = [name for name, rows in datasets.items()
                 if not (DATA_DIR / name).is_file()
                 or (DATA_DIR / name).read_bytes() != to_jsonl(rows)]
        if stale:
            print(f"out of date: {', '.join(stale)}; run python3 data/generate.py",
                  file=sys.stderr)
            return 1
        print("all data files are up to date")
        return 0
    if not args.stats:
        for name, rows in datasets.items():
            (DATA_DIR / name).write_bytes(to_jsonl(rows))
            print(f"wrote {DATA_DIR / name} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
