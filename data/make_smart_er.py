"""Make SMART-ER style SFT data: step-by-step chains that decide "my own knowledge" vs "call a tool".

Paper: Qian et al., 2025, "SMART: Self-Aware Agent for Tool Overuse Mitigation" (arXiv 2502.11435).
The boundary is set for SmolLM2-135M-Instruct, the project's embedded model:
  math   one-digit operands (3 + 5, 7 * 6, 9 - 4)         -> reason internally, no tool
         two-digit-or-harder (47 * 89, 385 + 947, ...)    -> Code, which evaluates the Python expression
  facts  stable, very common facts (capital of France)    -> answer directly
         obscure but checkable facts (atomic number of Hf) -> Search, answered from SEARCH_CORPUS below

Differences from the paper, and why:
  1. Two domains (Math, Facts) and two tools (Code, Search); no AskUser/Intention domain, because a 135M model
     needs one clear boundary per domain to learn from a few hundred rows.
  2. One step per chain (the decision), not multi-step plans: the questions are single operations or single facts.
  3. "Search" is a small bundled dict (SEARCH_CORPUS), so the data and any evaluation run offline.
  4. The "facts" boundary is obscurity (a tiny model cannot know the atomic number of hafnium) rather than the
     paper's time-sensitivity, since nothing in the corpus changes over time.

Usage:
  python data/make_smart_er.py --out-dir data --n-train 600 --n-test 120 --seed 0
Writes smart_er_train.jsonl and smart_er_test.jsonl; the same arguments give the same bytes on every run.
Test facts are disjoint from train facts and test math operands are disjoint from train operands.
"""

import argparse
import json
import os
import random
import re
import zlib

SYSTEM_PROMPT = (
    "You are a careful assistant who thinks step by step and knows the limits of your own knowledge.\n"
    "Tools:\n"
    "- Code: evaluates a Python arithmetic expression and returns the result.\n"
    "- Search: looks up a fact and returns a short text snippet.\n"
    "Use a tool only when your own knowledge is not enough; otherwise answer from what you know.\n"
    "Format: write each step as '- Step N: <subgoal>. (general reasoning) <why>' or "
    "'- Step N: <subgoal>. (tool: Code)' / '(tool: Search)' followed by why. "
    "After a tool step, put the request alone on the last line, as 'Code: <expression>' or "
    "'Search: <query>', and stop; the result comes back as '- Output: <result>'. "
    "End with a line '### Final Response' followed by your answer."
)

TOOLS = ("Code", "Search")
ROLES = ("system", "user", "assistant", "tool")
FINAL_MARKER = "### Final Response"
OUTPUT_PREFIX = "- Output: "

# ---------------------------------------------------------------------------------------------------------------
# Facts a 135M chat model plausibly knows: (key, subject, question phrasings, answer, statement).
# ---------------------------------------------------------------------------------------------------------------
KNOWN_FACTS = [
    ("capital_france", "the capital of France",
     ["What is the capital of France?", "Which city is the capital of France?", "Name the capital city of France."],
     "Paris", "The capital of France is Paris."),
    ("capital_italy", "the capital of Italy",
     ["What is the capital of Italy?", "Which city is the capital of Italy?", "Name the capital city of Italy."],
     "Rome", "The capital of Italy is Rome."),
    ("capital_japan", "the capital of Japan",
     ["What is the capital of Japan?", "Which city is the capital of Japan?", "Name the capital city of Japan."],
     "Tokyo", "The capital of Japan is Tokyo."),
    ("capital_germany", "the capital of Germany",
     ["What is the capital of Germany?", "Which city is the capital of Germany?",
      "Name the capital city of Germany."],
     "Berlin", "The capital of Germany is Berlin."),
    ("capital_spain", "the capital of Spain",
     ["What is the capital of Spain?", "Which city is the capital of Spain?", "Name the capital city of Spain."],
     "Madrid", "The capital of Spain is Madrid."),
    ("capital_uk", "the capital of the United Kingdom",
     ["What is the capital of the United Kingdom?", "Which city is the capital of England?",
      "Name the capital city of the UK."],
     "London", "The capital of the United Kingdom is London."),
    ("capital_russia", "the capital of Russia",
     ["What is the capital of Russia?", "Which city is the capital of Russia?", "Name the capital city of Russia."],
     "Moscow", "The capital of Russia is Moscow."),
    ("capital_china", "the capital of China",
     ["What is the capital of China?", "Which city is the capital of China?", "Name the capital city of China."],
     "Beijing", "The capital of China is Beijing."),
    ("week_days", "the number of days in a week",
     ["How many days are there in a week?", "How many days does a week have?", "A week has how many days?"],
     "7", "A week has 7 days."),
    ("year_months", "the number of months in a year",
     ["How many months are there in a year?", "How many months does a year have?", "A year has how many months?"],
     "12", "A year has 12 months."),
    ("day_hours", "the number of hours in a day",
     ["How many hours are there in a day?", "How many hours does a day have?", "A day has how many hours?"],
     "24", "A day has 24 hours."),
    ("hour_minutes", "the number of minutes in an hour",
     ["How many minutes are there in an hour?", "How many minutes does an hour have?",
      "An hour has how many minutes?"],
     "60", "An hour has 60 minutes."),
    ("year_days", "the number of days in a normal year",
     ["How many days are there in a year that is not a leap year?", "How many days does a normal year have?"],
     "365", "A normal year has 365 days."),
    ("spider_legs", "the number of legs a spider has",
     ["How many legs does a spider have?", "A spider has how many legs?", "How many legs do spiders have?"],
     "8", "A spider has 8 legs."),
    ("dog_legs", "the number of legs a dog has",
     ["How many legs does a dog have?", "A dog has how many legs?", "How many legs do dogs have?"],
     "4", "A dog has 4 legs."),
    ("triangle_sides", "the number of sides of a triangle",
     ["How many sides does a triangle have?", "A triangle has how many sides?",
      "How many sides are there in a triangle?"],
     "3", "A triangle has 3 sides."),
    ("water_boil", "the boiling point of water in Celsius",
     ["At what temperature in degrees Celsius does water boil?", "What is the boiling point of water in Celsius?",
      "Water boils at how many degrees Celsius?"],
     "100", "Water boils at 100 degrees Celsius."),
    ("water_freeze", "the freezing point of water in Celsius",
     ["At what temperature in degrees Celsius does water freeze?",
      "What is the freezing point of water in Celsius?", "Water freezes at how many degrees Celsius?"],
     "0", "Water freezes at 0 degrees Celsius."),
    ("largest_planet", "the largest planet in the solar system",
     ["What is the largest planet in our solar system?", "Which planet is the biggest in the solar system?",
      "Name the largest planet orbiting the Sun."],
     "Jupiter", "The largest planet in the solar system is Jupiter."),
    ("red_planet", "the planet known as the Red Planet",
     ["Which planet is known as the Red Planet?", "What planet is called the Red Planet?"],
     "Mars", "Mars is known as the Red Planet."),
    ("home_planet", "the planet we live on",
     ["What planet do we live on?", "Which planet is home to humans?", "Name the planet that people live on."],
     "Earth", "We live on the planet Earth."),
    ("sky_colour", "the colour of the sky on a clear day",
     ["What colour is the sky on a clear day?", "What color is the sky when there are no clouds?",
      "On a sunny day, what colour is the sky?"],
     "blue", "On a clear day the sky is blue."),
    ("grass_colour", "the colour of grass",
     ["What colour is grass?", "What color is healthy grass?", "Grass is usually what colour?"],
     "green", "Grass is green."),
    ("snow_colour", "the colour of snow",
     ["What colour is snow?", "What color is fresh snow?", "Snow is usually what colour?"],
     "white", "Snow is white."),
    ("bees_make", "what bees make",
     ["What do bees make?", "What sweet food do bees produce?", "Which food is made by bees?"],
     "honey", "Bees make honey."),
    ("cows_give", "the drink that cows give",
     ["What drink do we get from cows?", "Which drink comes from cows?", "Cows give us what drink?"],
     "milk", "Cows give milk."),
    ("largest_ocean", "the largest ocean on Earth",
     ["What is the largest ocean on Earth?", "Which ocean is the biggest?", "Name the largest ocean in the world."],
     "Pacific", "The largest ocean on Earth is the Pacific Ocean."),
    ("earth_moon", "the natural satellite of the Earth",
     ["What is the name of the natural satellite that orbits the Earth?",
      "What do we call the natural satellite of the Earth?"],
     "Moon", "The Earth's natural satellite is the Moon."),
    ("our_star", "the star at the centre of the solar system",
     ["What star is at the centre of our solar system?", "Which star does the Earth orbit?"],
     "Sun", "The Earth orbits the Sun, the star at the centre of the solar system."),
]

# ---------------------------------------------------------------------------------------------------------------
# Facts a 135M model cannot know. Each becomes one SEARCH_CORPUS entry (query -> short, true snippet).
# ---------------------------------------------------------------------------------------------------------------
# (name, symbol, atomic number): stable by definition.
ELEMENTS = [
    ("yttrium", "Y", 39), ("zirconium", "Zr", 40), ("niobium", "Nb", 41), ("molybdenum", "Mo", 42),
    ("technetium", "Tc", 43), ("ruthenium", "Ru", 44), ("rhodium", "Rh", 45), ("palladium", "Pd", 46),
    ("lanthanum", "La", 57), ("cerium", "Ce", 58), ("praseodymium", "Pr", 59), ("neodymium", "Nd", 60),
    ("promethium", "Pm", 61), ("samarium", "Sm", 62), ("europium", "Eu", 63), ("gadolinium", "Gd", 64),
    ("terbium", "Tb", 65), ("dysprosium", "Dy", 66), ("holmium", "Ho", 67), ("erbium", "Er", 68),
    ("thulium", "Tm", 69), ("ytterbium", "Yb", 70), ("lutetium", "Lu", 71), ("hafnium", "Hf", 72),
    ("tantalum", "Ta", 73), ("tungsten", "W", 74), ("rhenium", "Re", 75), ("osmium", "Os", 76),
    ("iridium", "Ir", 77), ("thallium", "Tl", 81), ("bismuth", "Bi", 83), ("astatine", "At", 85),
    ("francium", "Fr", 87), ("actinium", "Ac", 89), ("protactinium", "Pa", 91), ("neptunium", "Np", 93),
    ("americium", "Am", 95), ("curium", "Cm", 96), ("berkelium", "Bk", 97), ("californium", "Cf", 98),
    ("einsteinium", "Es", 99), ("fermium", "Fm", 100), ("mendelevium", "Md", 101), ("nobelium", "No", 102),
    ("lawrencium", "Lr", 103), ("rutherfordium", "Rf", 104), ("dubnium", "Db", 105), ("seaborgium", "Sg", 106),
    ("bohrium", "Bh", 107), ("hassium", "Hs", 108), ("meitnerium", "Mt", 109), ("darmstadtium", "Ds", 110),
    ("roentgenium", "Rg", 111), ("copernicium", "Cn", 112), ("nihonium", "Nh", 113), ("flerovium", "Fl", 114),
    ("moscovium", "Mc", 115), ("livermorium", "Lv", 116), ("tennessine", "Ts", 117), ("oganesson", "Og", 118),
]
# (name, height above sea level in metres, where).
MOUNTAINS = [
    ("K2", 8611, "on the border between Pakistan and China in the Karakoram"),
    ("Kangchenjunga", 8586, "on the border between Nepal and India in the Himalayas"),
    ("Lhotse", 8516, "on the border between Nepal and China, next to Everest"),
    ("Makalu", 8485, "on the border between Nepal and China in the Himalayas"),
    ("Cho Oyu", 8188, "on the border between Nepal and China in the Himalayas"),
    ("Dhaulagiri I", 8167, "in Nepal"),
    ("Manaslu", 8163, "in Nepal"),
    ("Nanga Parbat", 8126, "in Pakistan, at the western end of the Himalayas"),
    ("Annapurna I", 8091, "in Nepal"),
    ("Aconcagua", 6961, "in the Andes of Argentina"),
    ("Denali", 6190, "in Alaska"),
    ("Mount Kilimanjaro", 5895, "in Tanzania"),
    ("Mount Elbrus", 5642, "in the Caucasus in Russia"),
    ("Mount Kenya", 5199, "in Kenya"),
    ("Mount Vinson", 4892, "in the Ellsworth Mountains of Antarctica"),
    ("the Matterhorn", 4478, "in the Alps on the border between Switzerland and Italy"),
    ("Mount Whitney", 4421, "in the Sierra Nevada of California"),
    ("Mount Rainier", 4392, "in Washington State"),
    ("Mount Fuji", 3776, "on Honshu in Japan"),
    ("Mount Cook", 3724, "in the Southern Alps of New Zealand"),
    ("Mount Kosciuszko", 2228, "in New South Wales, Australia"),
    ("Ben Nevis", 1345, "in the Scottish Highlands"),
    ("Snowdon", 1085, "in Wales"),
]
# (name, founding year, where).
UNIVERSITIES = [
    ("the University of Salamanca", 1218, "Spain"), ("the University of Padua", 1222, "Italy"),
    ("the University of Coimbra", 1290, "Portugal"), ("Charles University", 1348, "Prague"),
    ("the Jagiellonian University", 1364, "Krakow, Poland"), ("the University of Vienna", 1365, "Austria"),
    ("Heidelberg University", 1386, "Germany"), ("Leipzig University", 1409, "Germany"),
    ("the University of St Andrews", 1413, "Scotland"), ("the University of Glasgow", 1451, "Scotland"),
    ("Uppsala University", 1477, "Sweden"), ("the University of Tübingen", 1477, "Germany"),
    ("the University of Copenhagen", 1479, "Denmark"), ("the University of Aberdeen", 1495, "Scotland"),
    ("Leiden University", 1575, "the Netherlands"), ("Trinity College Dublin", 1592, "Ireland"),
    ("Yale University", 1701, "New Haven, Connecticut"), ("Princeton University", 1746, "New Jersey"),
]
# (name, year, one-clause description).
EVENTS = [
    ("the Battle of Kosovo", 1389, "Serbian forces fought an Ottoman army"),
    ("the Battle of Grunwald", 1410, "Poland and Lithuania defeated the Teutonic Knights"),
    ("the Battle of Agincourt", 1415, "an English army under Henry V defeated a larger French army"),
    ("the Battle of Bosworth Field", 1485, "Richard III of England was killed and Henry Tudor took the throne"),
    ("the signing of the Treaty of Tordesillas", 1494, "Spain and Portugal divided newly found lands between them"),
    ("the Diet of Worms", 1521, "Martin Luther refused to take back his writings"),
    ("the Battle of Mohács", 1526, "the Ottoman army defeated the Kingdom of Hungary"),
    ("the Battle of Lepanto", 1571, "the fleet of the Holy League defeated the Ottoman navy"),
    ("the Battle of White Mountain", 1620, "Bohemian forces were defeated near Prague early in the Thirty Years' War"),
    ("the Peace of Westphalia", 1648, "treaties ended the Thirty Years' War"),
    ("the signing of the Treaty of Nerchinsk", 1689, "Russia and Qing China agreed on a border"),
    ("the signing of the Treaty of Utrecht", 1713, "treaties ended the War of the Spanish Succession"),
    ("the Battle of Plassey", 1757, "Robert Clive's East India Company forces defeated the Nawab of Bengal"),
    ("the Battle of Ayacucho", 1824, "a decisive victory in the Spanish American wars of independence was won in Peru"),
    ("the signing of the Treaty of Nanking", 1842, "the First Opium War between Britain and China ended"),
    ("the eruption of Krakatoa", 1883, "the volcano in Indonesia exploded violently"),
    ("the Tunguska event", 1908, "a huge explosion flattened forest in Siberia"),
    ("the Halifax Explosion", 1917, "a munitions ship blew up in the harbour of Halifax, Nova Scotia"),
]


def _cap(text):
    return text[:1].upper() + text[1:]


def _search_facts():
    """Build the searchable facts: one dict per fact with its questions, query, answer and corpus snippet."""
    facts = []
    for name, sym, z in ELEMENTS:
        group = ("a lanthanide" if 57 <= z <= 71 else "an actinide" if 89 <= z <= 103
                 else "a synthetic superheavy element" if z >= 104 else "a halogen" if z == 85 else "a metal")
        facts.append(dict(
            key=f"element_{name}", category="element", subject=f"the atomic number of {name}",
            topic="the atomic number of an uncommon element",
            questions=[f"What is the atomic number of {name}?", f"Which atomic number does {name} have?",
                       f"How many protons does an atom of {name} have?"],
            answer=str(z), statement=f"The atomic number of {name} is {z}.",
            query=f"atomic number of {name}",
            snippet=f"{_cap(name)} (symbol {sym}) is {group} with atomic number {z}."))
    for name, metres, where in MOUNTAINS:
        facts.append(dict(
            key=f"mountain_{name}", category="mountain", subject=f"the elevation of {name}",
            topic="the exact elevation of a particular mountain",
            questions=[f"How high is {name}, in metres?", f"What is the elevation of {name} in metres?",
                       f"How many metres above sea level is the summit of {name}?"],
            answer=str(metres), statement=f"{_cap(name)} is {metres} metres high.",
            query=f"elevation of {name} in metres",
            snippet=f"{_cap(name)}, {where}, rises to {metres} metres above sea level."))
    for name, year, where in UNIVERSITIES:
        facts.append(dict(
            key=f"university_{name}", category="university", subject=f"the founding year of {name}",
            topic="the founding year of a specific university",
            questions=[f"In what year was {name} founded?", f"When was {name} established? Give the year.",
                       f"What is the founding year of {name}?"],
            answer=str(year), statement=f"{_cap(name)} was founded in {year}.",
            query=f"founding year of {name}",
            snippet=f"{_cap(name)} ({where}) was founded in {year}."))
    for name, year, what in EVENTS:
        facts.append(dict(
            key=f"event_{name}", category="event", subject=f"the year of {name}",
            topic="the year of a lesser-known historical event",
            questions=[f"In what year did {name} take place?", f"When did {name} happen? Give the year.",
                       f"What year was {name}?"],
            answer=str(year), statement=f"{_cap(name)} took place in {year}.",
            query=f"year of {name}",
            snippet=f"{_cap(name)}: in {year}, {what}."))
    return facts


SEARCH_FACTS = _search_facts()
SEARCH_CORPUS = {f["query"]: f["snippet"] for f in SEARCH_FACTS}
KNOWN = [dict(key=k, category="known", subject=s, questions=q, answer=a, statement=st)
         for k, s, q, a, st in KNOWN_FACTS]

# Wrappers multiply question phrasings so train can hold several distinct texts of the same fact.
WRAPPERS = ["{q}", "Quick question: {q}", "Please answer this: {q}", "I have a question. {q}",
            "Can you help me? {q}", "Tell me this: {q}"]
MATH_QUESTIONS = ["What is {e}?", "Compute {e}.", "Calculate {e}.", "How much is {e}?", "Work out {e}.",
                  "What does {e} equal?"]

# ---------------------------------------------------------------------------------------------------------------
# Step templates. Justifications name the reason: difficulty for math, stability vs obscurity for facts.
# ---------------------------------------------------------------------------------------------------------------
MATH_SUBGOALS = ["Compute {e}", "Work out the value of {e}", "Evaluate {e}", "Find the result of {e}"]
EASY_WHY = ["{What} is well within my ability, so no tool is needed.",
            "I know {what} like this by heart; calling a tool would be wasted effort.",
            "{What} is simple enough for me to do reliably in my head."]
HARD_WHY = ["{What} is where I often make mistakes, so I will let Code compute it exactly.",
            "I cannot trust myself with {what}; Code will give the exact value.",
            "{What} is beyond my mental arithmetic, so running it in Code is safer."]
EASY_WHAT = {"+": "one-digit addition", "-": "one-digit subtraction", "*": "one-digit multiplication"}
HARD_WHAT = {"mul2x2": "multiplying two two-digit numbers",
             "mul2x1": "multiplying a two-digit number by a digit, with carries",
             "mul3x2": "multiplying a three-digit number by a two-digit number",
             "add3x3": "adding two three-digit numbers with carries",
             "sub4x3": "subtracting a three-digit number from a four-digit number",
             "mixed": "an expression with several multi-digit steps"}
MATH_FINAL = ["The answer is {a}.", "{e} = {a}.", "The result is {a}."]
KNOWN_SUBGOALS = ["Recall {s}", "Identify {s}", "State {s}"]
SEARCH_SUBGOALS = ["Find {s}", "Determine {s}", "Establish {s}"]
KNOWN_WHY = ["This is a stable, widely known fact that I am sure of, so I can answer without a tool.",
             "Everyday knowledge like this does not change, and I know it reliably.",
             "This is basic, unchanging general knowledge that I can recall with confidence."]
SEARCH_WHY = ["{Topic} is an obscure detail that I cannot recall reliably, so I will search for it.",
              "I do not know {topic} with confidence, and a wrong guess is worse than a quick lookup.",
              "Exact details such as {topic} lie outside what I remember reliably; Search can confirm it."]
KNOWN_FINAL = ["{st}", "The answer is {a}. {st}", "{st} So the answer is {a}."]
SEARCH_FINAL = ["{st}", "According to the search result, the answer is {a}. {st}", "The search result confirms it: {st}"]

EXPR_RE = re.compile(r"\d+(?: [-+*] \d+)+")
FACT_BY_QUESTION = {}
for _f in KNOWN + SEARCH_FACTS:
    for _q in _f["questions"]:
        for _w in WRAPPERS:
            assert _w.format(q=_q) not in FACT_BY_QUESTION, f"question {_q!r} names two facts"
            FACT_BY_QUESTION[_w.format(q=_q)] = _f


def math_expression(question):
    """The arithmetic expression inside a math question, e.g. '47 * 89'."""
    m = EXPR_RE.search(question)
    if m is None:
        raise ValueError(f"no arithmetic expression in question {question!r}")
    return m.group(0)


def math_needs_tool(expr):
    """The knowledge boundary for math: one operation on one-digit numbers is easy; anything else needs Code."""
    nums = re.findall(r"\d+", expr)
    return not (len(nums) == 2 and all(len(n) == 1 for n in nums))


def eval_arith(expr):
    """What the Code tool returns: the Python value of a +, -, * expression of integers, as a string."""
    if not re.fullmatch(r"[0-9+\-* ()]+", expr):
        raise ValueError(f"not a plain arithmetic expression: {expr!r}")
    return str(eval(expr, {"__builtins__": {}}, {}))  # safe: digits, spaces, + - * ( ) only


def _hard_kind(expr):
    nums = [len(n) for n in re.findall(r"\d+", expr)]
    ops = re.findall(r" ([-+*]) ", expr)
    if len(ops) > 1:
        return "mixed"
    names = {("*", 2, 2): "mul2x2", ("*", 2, 1): "mul2x1", ("*", 3, 2): "mul3x2", ("+", 3, 3): "add3x3",
             ("-", 4, 3): "sub4x3"}
    return names.get((ops[0], nums[0], nums[1]), "mixed")


def _pick(options, *key):
    """Deterministic template choice from the row's own text, so build_messages(row) is a pure function."""
    return options[zlib.crc32("|".join(str(k) for k in key).encode("utf-8")) % len(options)]


def build_messages(row, seed=0):
    """The chat messages for a row, rebuilt from its fields (domain, needs_tool, question, answer, id).

    Math: the expression is read from the question; Code's output is its Python value.
    Facts: the fact is found from the question text; Search's output is the SEARCH_CORPUS snippet.
    """
    q, a, rid = row["question"], row["answer"], row["id"]
    msgs = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": q}]
    if row["domain"] == "math":
        e = math_expression(q)
        assert row["needs_tool"] == math_needs_tool(e), f"needs_tool disagrees with the boundary for {e!r}"
        assert eval_arith(e) == a, f"answer {a!r} != value of {e!r}"
        subgoal = _pick(MATH_SUBGOALS, seed, rid, q, "sub").format(e=e)
        final = FINAL_MARKER + "\n" + _pick(MATH_FINAL, seed, rid, q, "fin").format(e=e, a=a)
        if not row["needs_tool"]:
            what = EASY_WHAT[re.search(r" ([-+*]) ", e).group(1)]
            why = _pick(EASY_WHY, seed, rid, q, "why").format(what=what, What=_cap(what))
            msgs.append({"role": "assistant",
                         "content": f"- Step 1: {subgoal}. (general reasoning) {why}\n{e} = {a}.\n{final}"})
            return msgs
        what = HARD_WHAT[_hard_kind(e)]
        why = _pick(HARD_WHY, seed, rid, q, "why").format(what=what, What=_cap(what))
        msgs.append({"role": "assistant", "content": f"- Step 1: {subgoal}. (tool: Code) {why}\nCode: {e}"})
        msgs.append({"role": "tool", "content": OUTPUT_PREFIX + eval_arith(e)})
        msgs.append({"role": "assistant", "content": final})
        return msgs
    fact = FACT_BY_QUESTION[q]
    assert fact["answer"] == a and row["needs_tool"] == (fact["category"] != "known"), f"row disagrees with fact {q!r}"
    if not row["needs_tool"]:
        subgoal = _pick(KNOWN_SUBGOALS, seed, rid, q, "sub").format(s=fact["subject"])
        why = _pick(KNOWN_WHY, seed, rid, q, "why")
        final = _pick(KNOWN_FINAL, seed, rid, q, "fin").format(st=fact["statement"], a=a)
        msgs.append({"role": "assistant", "content": f"- Step 1: {subgoal}. (general reasoning) {why}\n"
                                                     f"{fact['statement']}\n{FINAL_MARKER}\n{final}"})
        return msgs
    subgoal = _pick(SEARCH_SUBGOALS, seed, rid, q, "sub").format(s=fact["subject"])
    why = _pick(SEARCH_WHY, seed, rid, q, "why").format(topic=fact["topic"], Topic=_cap(fact["topic"]))
    final = _pick(SEARCH_FINAL, seed, rid, q, "fin").format(st=fact["statement"], a=a)
    msgs.append({"role": "assistant", "content": f"- Step 1: {subgoal}. (tool: Search) {why}\nSearch: {fact['query']}"})
    msgs.append({"role": "tool", "content": OUTPUT_PREFIX + SEARCH_CORPUS[fact["query"]]})
    msgs.append({"role": "assistant", "content": f"{FINAL_MARKER}\n{final}"})
    return msgs


def validate_row(row, path, line_no):
    """Raise ValueError naming file, line and field when a row does not follow the SMART-ER format."""
    def bad(field, why):
        raise ValueError(f"{path}:{line_no}: field '{field}': {why}")

    if not isinstance(row, dict):
        bad("<row>", "expected a JSON object")
    for field, typ in [("id", str), ("domain", str), ("needs_tool", bool), ("question", str), ("answer", str),
                       ("messages", list)]:
        if field not in row:
            bad(field, "missing")
        if not isinstance(row[field], typ):
            bad(field, f"expected {typ.__name__}, got {type(row[field]).__name__}")
    if row["domain"] not in ("math", "facts"):
        bad("domain", f"unknown domain {row['domain']!r}")
    if "tool" not in row:
        bad("tool", "missing")
    if row["tool"] is not None and row["tool"] not in TOOLS:
        bad("tool", f"unknown tool {row['tool']!r}")
    if row["needs_tool"] != (row["tool"] is not None):
        bad("tool", f"tool={row['tool']!r} disagrees with needs_tool={row['needs_tool']}")
    msgs = row["messages"]
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            bad(f"messages[{i}]", "expected an object with a string 'content'")
        if m.get("role") not in ROLES:
            bad(f"messages[{i}].role", f"unknown role {m.get('role')!r}")
        if m["role"] == "tool":
            prev = msgs[i - 1]["content"].rsplit("\n", 1)[-1] if i > 0 and msgs[i - 1]["role"] == "assistant" else ""
            if not re.match(r"(Code|Search): \S", prev):
                bad(f"messages[{i}]", "tool message without a preceding 'Code: ...' or 'Search: ...' request")
            if not m["content"].startswith(OUTPUT_PREFIX):
                bad(f"messages[{i}].content", f"tool output must start with {OUTPUT_PREFIX!r}")
    roles = [m["role"] for m in msgs]
    want = ["system", "user", "assistant"] + (["tool", "assistant"] if row["needs_tool"] else [])
    if roles != want:
        bad("messages", f"roles {roles} do not match needs_tool={row['needs_tool']} (expected {want})")
    if msgs[1]["content"] != row["question"]:
        bad("messages[1].content", "user message differs from 'question'")
    first = msgs[2]["content"]
    marker = f"(tool: {row['tool']})" if row["needs_tool"] else "(general reasoning)"
    if not first.startswith("- Step 1: ") or marker not in first.split("\n", 1)[0]:
        bad("messages[2].content", f"first line must be '- Step 1: ... {marker} ...'")
    if row["needs_tool"]:
        last = first.rsplit("\n", 1)[-1]
        if not last.startswith(f"{row['tool']}: "):
            bad("messages[2].content", f"last line must be '{row['tool']}: ...', got {last!r}")
        if row["tool"] == "Code" and msgs[3]["content"] != OUTPUT_PREFIX + eval_arith(last[len("Code: "):]):
            bad("messages[3].content", "Code output differs from the value of the expression")
    final = msgs[-1]["content"]
    if FINAL_MARKER not in final or row["answer"] not in final.split(FINAL_MARKER, 1)[1]:
        bad(f"messages[{len(msgs) - 1}].content", f"needs '{FINAL_MARKER}' followed by the answer {row['answer']!r}")


# ---------------------------------------------------------------------------------------------------------------
# Sampling: balanced domains x needs_tool; test facts and test operands disjoint from train.
# ---------------------------------------------------------------------------------------------------------------
def _round_robin(rng, groups, n, what):
    """Pick n distinct questions, one per group (fact or expression) per round, so groups are used evenly."""
    pools = [rng.sample(g, len(g)) for g in groups]
    rng.shuffle(pools)
    out = []
    while len(out) < n:
        if not any(pools):
            raise ValueError(f"not enough distinct {what} questions for {n} rows; lower --n-train/--n-test")
        for p in pools:
            if p and len(out) < n:
                out.append(p.pop())
    return out


def _fact_questions(fact):
    return [(w.format(q=q), fact) for q in fact["questions"] for w in WRAPPERS]


def _split_facts(rng, facts, test_frac):
    """Disjoint train/test facts, split within each category so both sides see every kind of fact."""
    train, test = [], []
    for cat in sorted({f["category"] for f in facts}):
        group = [f for f in facts if f["category"] == cat]
        rng.shuffle(group)
        k = max(1, round(test_frac * len(group)))
        test += group[:k]
        train += group[k:]
    return train, test


def _easy_keys():
    keys = [("+", a, b) for a in range(1, 10) for b in range(a, 10)]
    keys += [("*", a, b) for a in range(1, 10) for b in range(a, 10)]
    keys += [("-", a, b) for a in range(1, 10) for b in range(1, a + 1)]
    return keys


def _easy_exprs(key):
    op, a, b = key
    if op == "-":
        return [f"{a} - {b}"]
    return sorted({f"{a} {op} {b}", f"{b} {op} {a}"})


HARD_RANGES = {"mul2x2": [(12, 99), (12, 99)], "mul2x1": [(13, 99), (3, 9)], "mul3x2": [(101, 999), (11, 99)],
               "add3x3": [(101, 999), (101, 999)], "sub4x3": [(1001, 9999), (101, 999)],
               "mixed": [(12, 99), (3, 9), (11, 99)]}


def _hard_expr(rng, kind):
    nums = []
    for lo, hi in HARD_RANGES[kind]:
        x = rng.randint(lo, hi)
        while x % 10 == 0:  # round numbers are easy; keep every hard case genuinely hard
            x = rng.randint(lo, hi)
        nums.append(x)
    if kind == "mixed":
        return f"{nums[0]} * {nums[1]} + {nums[2]}"
    op = {"mul": "*", "add": "+", "sub": "-"}[kind[:3]]
    return f"{nums[0]} {op} {nums[1]}"


def _operand_key(expr):
    return tuple(sorted(int(n) for n in re.findall(r"\d+", expr)))


def _hard_questions(rng, n, banned):
    kinds = sorted(HARD_RANGES)
    out, used = [], set()
    for i in range(n):
        e = _hard_expr(rng, kinds[i % len(kinds)])
        while _operand_key(e) in banned or _operand_key(e) in used:
            e = _hard_expr(rng, kinds[i % len(kinds)])
        used.add(_operand_key(e))
        out.append(rng.choice(MATH_QUESTIONS).format(e=e))
    return out, used


def _halves(n):
    return n // 2, n - n // 2


def generate(n_train=600, n_test=120, seed=0, test_frac=0.3):
    """Return (train_rows, test_rows). Same arguments -> same rows."""
    rng = random.Random(seed)
    (m_tr, f_tr), (m_te, f_te) = _halves(n_train), _halves(n_test)
    items = {"train": [], "test": []}  # (domain, needs_tool, question, answer)

    # math, easy: test operand pairs are disjoint from train operand pairs
    keys = rng.sample(_easy_keys(), len(_easy_keys()))
    easy_te, easy_tr = _halves(m_te)[0], _halves(m_tr)[0]
    test_keys = keys[:easy_te]
    qs = lambda ks: [[rng.choice(MATH_QUESTIONS).format(e=e) for e in _easy_exprs(k)] for k in ks]
    for split, ks, n in [("test", test_keys, easy_te), ("train", keys[easy_te:], easy_tr)]:
        for q in _round_robin(rng, qs(ks), n, "easy math"):
            items[split].append(("math", False, q, eval_arith(math_expression(q))))
    # math, hard
    hard_te, used = _hard_questions(rng, m_te - easy_te, set())
    hard_tr, _ = _hard_questions(rng, m_tr - easy_tr, used)
    for split, qlist in [("test", hard_te), ("train", hard_tr)]:
        items[split] += [("math", True, q, eval_arith(math_expression(q))) for q in qlist]

    # facts: known and searchable, with disjoint train/test facts
    for pool, needs_tool in [(KNOWN, False), (SEARCH_FACTS, True)]:
        tr_facts, te_facts = _split_facts(rng, pool, test_frac)
        for split, facts, n in [("test", te_facts, _halves(f_te)[needs_tool]),
                                ("train", tr_facts, _halves(f_tr)[needs_tool])]:
            for q, fact in _round_robin(rng, [_fact_questions(f) for f in facts], n, "facts"):
                items[split].append(("facts", needs_tool, q, fact["answer"]))

    out = []
    for split in ("train", "test"):
        rng.shuffle(items[split])
        counters, rows = {"math": 0, "facts": 0}, []
        for domain, needs_tool, q, a in items[split]:
            row = {"id": f"{domain}-{counters[domain]:04d}", "domain": domain, "needs_tool": needs_tool,
                   "tool": (("Code" if domain == "math" else "Search") if needs_tool else None),
                   "question": q, "answer": a}
            counters[domain] += 1
            row["messages"] = build_messages(row, seed)
            validate_row(row, f"<{split}>", len(rows) + 1)
            rows.append(row)
        out.append(rows)
    train, test = out
    assert not {r["question"] for r in train} & {r["question"] for r in test}, "train/test questions overlap"
    assert len({r["question"] for r in train}) == len(train) and len({r["question"] for r in test}) == len(test)
    return train, test


def to_jsonl(rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", default="data", help="folder for smart_er_train.jsonl and smart_er_test.jsonl")
    p.add_argument("--n-train", type=int, default=600, help="number of training rows (half math, half facts)")
    p.add_argument("--n-test", type=int, default=120, help="number of test rows (facts disjoint from train)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling questions and templates")
    args = p.parse_args(argv)
    train, test = generate(args.n_train, args.n_test, args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    for name, rows in [("smart_er_train.jsonl", train), ("smart_er_test.jsonl", test)]:
        with open(os.path.join(args.out_dir, name), "w", encoding="utf-8", newline="\n") as f:
            f.write(to_jsonl(rows))
        print(f"wrote {len(rows)} rows to {os.path.join(args.out_dir, name)}")


if __name__ == "__main__":
    main()
