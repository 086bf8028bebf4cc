"""Knowledge-boundary QA for algos/otc_ppo.py: a corpus, RL questions with a known optimal number of searches, and
SFT warm-start trajectories in the rollout format.

- memory (optimal_calls 0): real facts SmolLM2-135M-Instruct answers right from memory. Each candidate is asked
  greedily ("Answer in a few words."); it is kept only when a gold answer appears in the reply (word match after
  normalisation). The corpus also holds a passage for each, so a search would find the answer too.
- 1hop (optimal_calls 1): facts about fictional countries, people and companies that only the corpus holds.
- 2hop (optimal_calls 2): two corpus facts chained ("the city where the founder of C was born").
Entities are drawn from fixed syllables with a fixed seed and split three ways (sft / train / test), so test
questions are about entities neither the warm start nor RL has seen. Deterministic: the same files every run.

Writes data/otc_corpus.jsonl, data/otc_train.jsonl, data/otc_test.jsonl, data/otc_sft.jsonl (chat rows for
algos/sft.py) and data/otc_memory_probe.jsonl (every memory candidate with the model's reply and the verdict).
Usage: python data/make_otc_qa.py [--out-dir data] [--model smollm2-135m]
"""
import argparse
import hashlib
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from algos.otc_ppo import PROMPT, BM25Retriever, format_docs, normalize_answer  # noqa: E402

# (question, gold answers, passage title, passage text)
MEMORY = [
    ("What is the capital of France?", ["Paris"], "France", "France is a country in Western Europe. Its capital is Paris."),
    ("What is the capital of Japan?", ["Tokyo"], "Japan", "Japan is an island country in East Asia. Its capital is Tokyo."),
    ("What is the capital of Italy?", ["Rome"], "Italy", "Italy is a country in Southern Europe. Its capital is Rome."),
    ("What is the capital of Germany?", ["Berlin"], "Germany", "Germany is a country in Central Europe. Its capital is Berlin."),
    ("What is the capital of Spain?", ["Madrid"], "Spain", "Spain is a country in Southern Europe. Its capital is Madrid."),
    ("What is the capital of England?", ["London"], "England", "England is part of the United Kingdom. Its capital is London."),
    ("What is the capital of Russia?", ["Moscow"], "Russia", "Russia is the largest country by area. Its capital is Moscow."),
    ("What is the capital of China?", ["Beijing"], "China", "China is a country in East Asia. Its capital is Beijing."),
    ("What is the capital of Egypt?", ["Cairo"], "Egypt", "Egypt is a country in North Africa. Its capital is Cairo."),
    ("What is the capital of Greece?", ["Athens"], "Greece", "Greece is a country in Southern Europe. Its capital is Athens."),
    ("What is the capital of Canada?", ["Ottawa"], "Canada", "Canada is a country in North America. Its capital is Ottawa."),
    ("What is the capital of Portugal?", ["Lisbon"], "Portugal", "Portugal is a country in Western Europe. Its capital is Lisbon."),
    ("What is the capital of Ireland?", ["Dublin"], "Ireland", "Ireland is an island country in Europe. Its capital is Dublin."),
    ("What is the capital of Austria?", ["Vienna"], "Austria", "Austria is a country in Central Europe. Its capital is Vienna."),
    ("What is the capital of Norway?", ["Oslo"], "Norway", "Norway is a country in Northern Europe. Its capital is Oslo."),
    ("What is the capital of Sweden?", ["Stockholm"], "Sweden", "Sweden is a country in Northern Europe. Its capital is Stockholm."),
    ("What is the capital of India?", ["New Delhi", "Delhi"], "India", "India is a country in South Asia. Its capital is New Delhi."),
    ("What is the capital of Mexico?", ["Mexico City"], "Mexico", "Mexico is a country in North America. Its capital is Mexico City."),
    ("What is the largest planet in the solar system?", ["Jupiter"], "Jupiter", "Jupiter is the largest planet in the solar system."),
    ("Which planet is known as the Red Planet?", ["Mars"], "Mars", "Mars is called the Red Planet because of its reddish surface."),
    ("What is the largest ocean on Earth?", ["Pacific", "Pacific Ocean"], "Pacific Ocean", "The Pacific Ocean is the largest ocean on Earth."),
    ("Who wrote Romeo and Juliet?", ["William Shakespeare", "Shakespeare"], "Romeo and Juliet", "Romeo and Juliet is a play written by William Shakespeare."),
    ("Who painted the Mona Lisa?", ["Leonardo da Vinci", "da Vinci", "Leonardo"], "Mona Lisa", "The Mona Lisa is a portrait painted by Leonardo da Vinci."),
    ("What color is the sky on a clear day?", ["blue"], "Sky", "On a clear day the sky looks blue."),
    ("What gas do plants take in from the air?", ["carbon dioxide", "CO2"], "Photosynthesis", "Plants take in carbon dioxide from the air to make sugar."),
    ("How many days are there in a week?", ["seven", "7"], "Week", "A week has seven days."),
    ("How many legs does a spider have?", ["eight", "8"], "Spider", "A spider has eight legs."),
    ("What is the freezing point of water in degrees Celsius?", ["0", "zero"], "Water", "Water freezes at 0 degrees Celsius."),
    ("What is the chemical symbol for gold?", ["Au"], "Gold", "Gold is a metal with the chemical symbol Au."),
    ("Which animal is known as the king of the jungle?", ["lion", "the lion"], "Lion", "The lion is called the king of the jungle."),
    ("What language is spoken in Brazil?", ["Portuguese"], "Brazil", "The main language spoken in Brazil is Portuguese."),
    ("What language is mostly spoken in Spain?", ["Spanish"], "Spanish language", "Spanish is the main language of Spain."),
    ("Who was the first president of the United States?", ["George Washington", "Washington"], "George Washington", "George Washington was the first president of the United States."),
    ("What is the tallest mountain in the world?", ["Mount Everest", "Everest"], "Mount Everest", "Mount Everest is the tallest mountain in the world."),
    ("What is the longest river in Africa?", ["Nile", "the Nile", "Nile River"], "Nile", "The Nile is the longest river in Africa."),
    ("What is the currency of Japan?", ["yen", "Japanese yen"], "Yen", "The yen is the currency of Japan."),
    ("What is the closest star to Earth?", ["Sun", "the Sun"], "Sun", "The Sun is the star closest to Earth."),
    ("In which country are the pyramids of Giza?", ["Egypt"], "Pyramids of Giza", "The pyramids of Giza stand in Egypt."),
    ("What is the main ingredient of guacamole?", ["avocado", "avocados"], "Guacamole", "Guacamole is made mainly from avocado."),
    ("Which continent is Kenya in?", ["Africa"], "Kenya", "Kenya is a country in East Africa."),
    ("What do bees make?", ["honey"], "Bee", "Bees make honey from the nectar of flowers."),
    ("What is the boiling point of water in degrees Celsius?", ["100", "one hundred"], "Boiling point", "Water boils at 100 degrees Celsius at sea level."),
    ("Which country is home to the kangaroo?", ["Australia"], "Kangaroo", "The kangaroo is native to Australia."),
    ("What is the largest mammal?", ["blue whale", "the blue whale"], "Blue whale", "The blue whale is the largest mammal."),
    ("Who discovered penicillin?", ["Alexander Fleming", "Fleming"], "Penicillin", "Penicillin was discovered by Alexander Fleming in 1928."),
]
ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "tr", "st"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
CODAS = ["", "n", "r", "l", "s", "th", "x", "nd"]
REGIONS = ["northern hills", "southern coast", "eastern plains", "western islands", "central highlands"]
PRODUCTS = ["tea", "bicycle", "lamp", "glass", "paper", "clock", "rope", "soap"]
JOBS = ["painter", "engineer", "sailor", "chemist", "poet", "architect", "baker", "astronomer"]
SPLITS = ("sft", "train", "test")


def fake_word(rng, used):
    """A capitalised pronounceable word never drawn before (and no real English/country name by construction)."""
    while True:
        w = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(2)) + rng.choice(CODAS)
        if w not in used and len(w) >= 5:
            used.add(w)
            return w.capitalize()


def fictional_world(rng, n_per_split=6):
    """Per split: n countries (capital), n people (birth city, job) and n companies (founder: a person of the same
    split, base: a country of the same split). Returns corpus passages and QA rows."""
    used, passages, rows = set(), [], []
    for split in SPLITS:
        countries = [(fake_word(rng, used), fake_word(rng, used), rng.choice(REGIONS)) for _ in range(n_per_split)]
        people = [(f"{fake_word(rng, used)} {fake_word(rng, used)}", fake_word(rng, used), rng.choice(JOBS))
                  for _ in range(n_per_split)]
        firms = [(f"{fake_word(rng, used)} {rng.choice(PRODUCTS).capitalize()} Company", i,
                  rng.randrange(n_per_split)) for i in rng.sample(range(n_per_split), n_per_split)]
        for name, capital, region in countries:
            passages.append({"title": name, "text": f"{name} is a small country in the {region}. Its capital is "
                                                    f"{capital}."})
            rows.append((split, "1hop", f"What is the capital of {name}?", [capital]))
        for name, city, job in people:
            passages.append({"title": name, "text": f"{name} is {'an' if job[0] in 'aeiou' else 'a'} {job}. {name.split()[0]} was born in {city}."})
            rows.append((split, "1hop", f"Where was {name} born?", [city]))
        for firm, p, c in firms:
            founder, country = people[p][0], countries[c]
            passages.append({"title": firm, "text": f"{firm} is based in {country[0]}. It was founded by "
                                                    f"{founder}."})
            rows.append((split, "1hop", f"Who founded {firm}?", [founder]))
            rows.append((split, "2hop", f"Where was the founder of {firm} born?", [people[p][1]]))
            rows.append((split, "2hop", f"What is the capital of the country where {firm} is based?", [country[1]]))
    return passages, rows


def contains_answer(reply, golds):
    words = f" {normalize_answer(reply)} "
    return any(f" {normalize_answer(g)} " in words for g in golds)


def probe_memory(model_name):
    """Greedy reply of the model to each memory candidate; (kept rows, probe log)."""
    from algos.model import generate, load_model, start_rollouts
    model, tokenizer = load_model(model_name, device="cpu")
    prompts = [[{"role": "user", "content": f"Answer in a few words. {q}"}] for q, *_ in MEMORY]
    replies = generate(model, tokenizer, start_rollouts(tokenizer, prompts), 24, temperature=0.0)
    log = [{"question": q, "answers": a, "reply": r.split(tokenizer.eos_token)[0].strip(),
            "kept": contains_answer(r.split(tokenizer.eos_token)[0], a)} for (q, a, *_), r in zip(MEMORY, replies)]
    return log


def h(text):
    return int(hashlib.sha1(text.encode()).hexdigest(), 16)


def sft_trajectories(row, retriever):
    """Warm-start trajectories in the rollout format: every way of answering the question the start policy should be
    able to sample. A memory question gets three: two answered from memory (two wordings of the thought) and one
    answered after a search (the over-searching of Search-R1-trained models, which OTC removes). Both modes are in the
    warm start's support, direct answers twice as often, so most RL groups of a memory question hold both and the
    reward decides between them. A 1-hop question searches once, or (a third of them) twice; a 2-hop question twice."""
    q, answer = row["question"], row["answers"][0]
    prompt = {"role": "user", "content": PROMPT.format(question=q)}  # the prompt of otc_ppo's rollouts

    def searched(*queries):
        turns = [prompt]
        for query in queries:
            turns.append({"role": "assistant", "content": f"<think> I need to look this up. </think>\n<search> "
                                                          f"{query} </search>"})
            turns.append({"role": "tool", "content": format_docs(retriever.search([query], 3)[0])})
        return turns + [{"role": "assistant", "content": f"<think> The information answers it. </think>\n<answer> "
                                                         f"{answer} </answer>"}]
    if row["kind"] == "memory":
        direct = [[prompt, {"role": "assistant", "content": f"<think> {thought} </think>\n<answer> {answer} </answer>"}]
                  for thought in ("I know this.", "I remember this fact.")]
        return direct + [searched(q.rstrip("?"))]
    if row["kind"] == "2hop":
        firm, hop = row["firm"], row["bridge"]
        return [searched(f"{firm} founded by" if "founder" in q else f"{firm} based in",
                         f"{hop} born" if "founder" in q else f"capital of {hop}")]
    return [searched(*[q.rstrip("?")] * (2 if h(q) % 3 == 0 else 1))]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=str(ROOT / "data"))
    parser.add_argument("--model", default="smollm2-135m", help="model whose memory defines the memory questions")
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(8)
    fict_passages, fict_rows = fictional_world(rng)
    passages = [{"title": t, "text": x} for _, _, t, x in MEMORY] + fict_passages
    passages = [{"id": f"doc-{i:03d}", **p} for i, p in enumerate(passages)]
    probe = probe_memory(args.model)
    kept = [p for p in probe if p["kept"]]
    rows = []
    for i, p in enumerate(kept):
        rows.append({"split": SPLITS[i % 3], "kind": "memory", "question": p["question"], "answers": p["answers"],
                     "optimal_calls": 0})
    bridges = {}  # 2-hop question -> the bridge entity (for the SFT second query)
    for p in fict_passages:
        if " Company" in p["title"]:
            bridges[p["title"]] = (p["text"].split("founded by ")[1].rstrip("."),
                                   p["text"].split("based in ")[1].split(".")[0])
    for split, kind, q, a in fict_rows:
        row = {"split": split, "kind": kind, "question": q, "answers": a, "optimal_calls": 1 if kind == "1hop" else 2}
        if kind == "2hop":
            firm = next(f for f in bridges if f in q)
            row["firm"], row["bridge"] = firm, bridges[firm][0] if "founder" in q else bridges[firm][1]
        rows.append(row)
    for i, r in enumerate(rows):
        r["id"] = f"otc-{r['split']}-{i:03d}"
    retriever = BM25Retriever(passages)

    def write(name, items):
        with open(out / name, "w") as f:
            f.writelines(json.dumps(x, ensure_ascii=False) + "\n" for x in items)
        print(f"{out / name}: {len(items)} rows")
    fields = ("id", "question", "answers", "kind", "optimal_calls")
    write("otc_corpus.jsonl", passages)
    write("otc_memory_probe.jsonl", probe)
    for split in ("train", "test"):
        write(f"otc_{split}.jsonl", [{k: r[k] for k in fields} for r in rows if r["split"] == split])
    write("otc_sft.jsonl", [{"id": f"{r['id']}.{j}", "messages": m} for r in rows if r["split"] == "sft"
                            for j, m in enumerate(sft_trajectories(r, retriever))])
    print(f"memory questions kept: {len(kept)} of {len(MEMORY)}")


if __name__ == "__main__":
    main()
