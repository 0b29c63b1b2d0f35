"""Generate the small deterministic demo datasets in dataset/demo/ (every training stage runs on them in seconds).

    python dataset/demo/make_demo.py            # rewrites dataset/demo/*.jsonl (same bytes every time)
    python dataset/demo/make_demo.py --out_dir /tmp/demo --seed 7

All data is procedural (templated facts and small-number arithmetic in Chinese and English), so it is ours to ship and
the RL stages get an exactly checkable reward. Arithmetic stays in single/double digit addition so that a tiny model
can learn it. Formats (one JSON object per line, UTF-8, MiniMind's formats):

pretrain.jsonl       {"text": "3 加 4 等于 7。..."}                      plain text, no chat markers
sft.jsonl            {"conversations": [{"role": "system"|"user"|"assistant"|"tool", "content": str,
                                         "tool_calls": [{"name": str, "arguments": {...}}] (assistant, optional),
                                         "reasoning_content": str (assistant, optional)}],
                      "tools": [{"type": "function", "function": {...JSON schema...}}] (optional)}
                     single and multi-turn, some with a system prompt, a few with tools / tool calls / tool results
dpo.jsonl            {"chosen": [msgs], "rejected": [msgs]}   same prompt; chosen correct, rejected a wrong answer
reason.jsonl         SFT format; assistant content is "<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>"
                     (matches the RL format reward ^<think>\\n.*?\\n</think>\\n<answer>\\n.*?\\n</answer>$)
rlaif.jsonl          SFT format; the last message is the assistant turn whose content is the checkable answer, the
                     correct sum as a plain number string (e.g. "7"); the prompt is everything before it
lora_identity.jsonl  SFT format; identity Q&A ("你是谁？" -> "我是 MiniMind ...")
"""
import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

ZH_DIGITS = "零一二三四五六七八九十"

# (zh, en) fact pairs used by pretrain, SFT and DPO so the stages share one small world.
CAPITALS = [
    ("中国", "China", "北京", "Beijing"), ("日本", "Japan", "东京", "Tokyo"), ("法国", "France", "巴黎", "Paris"),
    ("英国", "the United Kingdom", "伦敦", "London"), ("德国", "Germany", "柏林", "Berlin"),
    ("意大利", "Italy", "罗马", "Rome"), ("俄罗斯", "Russia", "莫斯科", "Moscow"),
    ("美国", "the United States", "华盛顿", "Washington"), ("加拿大", "Canada", "渥太华", "Ottawa"),
    ("埃及", "Egypt", "开罗", "Cairo"), ("韩国", "South Korea", "首尔", "Seoul"), ("西班牙", "Spain", "马德里", "Madrid"),
]
COLORS = [
    ("天空", "the sky", "蓝色", "blue"), ("草", "grass", "绿色", "green"), ("雪", "snow", "白色", "white"),
    ("煤", "coal", "黑色", "black"), ("香蕉", "a ripe banana", "黄色", "yellow"), ("血", "blood", "红色", "red"),
]
ANIMALS = [
    ("猫", "cat", 4), ("狗", "dog", 4), ("鸡", "chicken", 2), ("鸭子", "duck", 2), ("马", "horse", 4),
    ("蜘蛛", "spider", 8), ("蚂蚁", "ant", 6), ("牛", "cow", 4),
]
WEEKDAYS_ZH = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"]
WEEKDAYS_EN = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
SEASONS = [("春天", "spring"), ("夏天", "summer"), ("秋天", "autumn"), ("冬天", "winter")]
GENERAL = [
    ("水在一百摄氏度时沸腾。", "Water boils at one hundred degrees Celsius."),
    ("太阳从东方升起，从西方落下。", "The sun rises in the east and sets in the west."),
    ("一年有十二个月。", "A year has twelve months."),
    ("一天有二十四个小时。", "A day has twenty-four hours."),
    ("一小时有六十分钟。", "An hour has sixty minutes."),
    ("地球绕着太阳转。", "The Earth goes around the Sun."),
    ("月亮绕着地球转。", "The Moon goes around the Earth."),
    ("鱼生活在水里。", "Fish live in water."),
    ("植物需要阳光和水。", "Plants need sunlight and water."),
    ("冰是固态的水。", "Ice is frozen water."),
    ("多读书可以增长知识。", "Reading books helps you learn."),
    ("按时睡觉对身体有好处。", "Going to bed on time is good for your health."),
]


def zh_number(n):
    """Chinese numerals for 0..99 (used for variety in the pretrain text)."""
    if n <= 10:
        return ZH_DIGITS[n]
    tens, ones = divmod(n, 10)
    head = "十" if tens == 1 else ZH_DIGITS[tens] + "十"
    return head + (ZH_DIGITS[ones] if ones else "")


def add_pair(rng, max_value=9):
    return rng.randint(0, max_value), rng.randint(0, max_value)


def pick_operands(rng):
    """Mostly single digit, some double digit: easy enough for a tiny model, still not memorisable at a glance."""
    return add_pair(rng, 9) if rng.random() < 0.7 else add_pair(rng, 49)


# ------------------------------------------------------------------------------------------------------------------
# Pretrain text

def pretrain_sentence(rng, lang):
    kind = rng.randrange(9)
    if kind <= 2:
        a, b = pick_operands(rng)
        if lang == "zh":
            form = rng.randrange(3)
            if form == 0:
                return f"{a} 加 {b} 等于 {a + b}。"
            if form == 1:
                return f"{a}+{b}={a + b}。"
            return f"{zh_number(a)}加{zh_number(b)}等于{zh_number(a + b)}。"
        return rng.choice([f"{a} plus {b} equals {a + b}.", f"{a}+{b}={a + b}.", f"The sum of {a} and {b} is {a + b}."])
    if kind == 3:
        zc, ec, zcap, ecap = rng.choice(CAPITALS)
        return f"{zc}的首都是{zcap}。" if lang == "zh" else f"The capital of {ec} is {ecap}."
    if kind == 4:
        zt, et, zcol, ecol = rng.choice(COLORS)
        return f"{zt}是{zcol}的。" if lang == "zh" else f"The color of {et} is {ecol}."
    if kind == 5:
        za, ea, legs = rng.choice(ANIMALS)
        return f"一只{za}有{'两' if legs == 2 else zh_number(legs)}条腿。" if lang == "zh" else f"A {ea} has {legs} legs."
    if kind == 6:
        i = rng.randrange(7)
        if lang == "zh":
            return f"{WEEKDAYS_ZH[i]}的后一天是{WEEKDAYS_ZH[(i + 1) % 7]}。"
        return f"The day after {WEEKDAYS_EN[i]} is {WEEKDAYS_EN[(i + 1) % 7]}."
    if kind == 7:
        a, b = rng.sample(range(0, 100), 2)
        big, small = max(a, b), min(a, b)
        return f"{big} 比 {small} 大。" if lang == "zh" else f"{big} is greater than {small}."
    zh, en = rng.choice(GENERAL)
    return zh if lang == "zh" else en


def make_pretrain(rng, n):
    rows = []
    for _ in range(n):
        lang = "zh" if rng.random() < 0.5 else "en"
        sentences = [pretrain_sentence(rng, lang) for _ in range(rng.randint(3, 7))]
        rows.append({"text": ("" if lang == "zh" else " ").join(sentences)})
    return rows


# ------------------------------------------------------------------------------------------------------------------
# Conversations

def arithmetic_question(rng, a, b, lang):
    if lang == "zh":
        return rng.choice([f"{a}+{b}=?", f"{a} 加 {b} 等于多少？", f"请计算 {a}+{b}。", f"{a}+{b}等于几？"])
    return rng.choice([f"{a}+{b}=?", f"What is {a} plus {b}?", f"Compute {a}+{b}.", f"What is {a}+{b}?"])


def arithmetic_answer(a, b, c, lang):
    return f"{a}+{b}={c}。" if lang == "zh" else f"{a}+{b}={c}."


def fact_qa(rng, lang):
    kind = rng.randrange(4)
    if kind == 0:
        zc, ec, zcap, ecap = rng.choice(CAPITALS)
        if lang == "zh":
            return f"{zc}的首都是哪里？", f"{zc}的首都是{zcap}。"
        return f"What is the capital of {ec}?", f"The capital of {ec} is {ecap}."
    if kind == 1:
        zt, et, zcol, ecol = rng.choice(COLORS)
        if lang == "zh":
            return f"{zt}是什么颜色的？", f"{zt}通常是{zcol}的。"
        return f"What color is {et}?", f"{et[0].upper() + et[1:]} is usually {ecol}."
    if kind == 2:
        za, ea, legs = rng.choice(ANIMALS)
        if lang == "zh":
            return f"一只{za}有几条腿？", f"一只{za}有{legs}条腿。"
        return f"How many legs does a {ea} have?", f"A {ea} has {legs} legs."
    i = rng.randrange(7)
    if lang == "zh":
        return f"{WEEKDAYS_ZH[i]}的后一天是星期几？", f"{WEEKDAYS_ZH[i]}的后一天是{WEEKDAYS_ZH[(i + 1) % 7]}。"
    return f"What day comes after {WEEKDAYS_EN[i]}?", f"The day after {WEEKDAYS_EN[i]} is {WEEKDAYS_EN[(i + 1) % 7]}."


GREETINGS = [
    ("你好", "你好！有什么可以帮你的吗？"), ("早上好", "早上好！祝你今天一切顺利。"), ("谢谢你", "不客气，很高兴能帮到你。"),
    ("Hello", "Hello! How can I help you today?"), ("Good morning", "Good morning! I hope you have a great day."),
    ("Thank you", "You're welcome. Glad I could help."),
]
SYSTEM_PROMPTS = [
    ("你是一个乐于助人的助手，回答要简洁。", "zh"), ("你是一位耐心的数学老师。", "zh"),
    ("You are a helpful assistant. Keep answers short.", "en"), ("You are a patient math tutor.", "en"),
]

CALC_TOOL = {"type": "function", "function": {
    "name": "add", "description": "Add two integers and return the sum.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
WEATHER = [("晴", "sunny"), ("多云", "cloudy"), ("小雨", "light rain"), ("阴", "overcast")]


def single_turn(rng):
    lang = "zh" if rng.random() < 0.5 else "en"
    r = rng.random()
    if r < 0.55:
        a, b = pick_operands(rng)
        q, ans = arithmetic_question(rng, a, b, lang), arithmetic_answer(a, b, a + b, lang)
    elif r < 0.9:
        q, ans = fact_qa(rng, lang)
    else:
        q, ans = rng.choice(GREETINGS)
    return [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]


def multi_turn(rng):
    convo = []
    for _ in range(rng.randint(2, 3)):
        convo += single_turn(rng)
    return convo


def with_system(rng):
    prompt, lang = rng.choice(SYSTEM_PROMPTS)
    a, b = pick_operands(rng)
    return [{"role": "system", "content": prompt},
            {"role": "user", "content": arithmetic_question(rng, a, b, lang)},
            {"role": "assistant", "content": arithmetic_answer(a, b, a + b, lang)}]


def with_tools(rng):
    lang = "zh" if rng.random() < 0.5 else "en"
    if rng.random() < 0.5:
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        user = f"用工具算一下 {a}+{b}。" if lang == "zh" else f"Use the tool to add {a} and {b}."
        call = {"name": "add", "arguments": {"a": a, "b": b}}
        result = json.dumps({"result": a + b})
        final = f"{a}+{b}={a + b}。" if lang == "zh" else f"{a}+{b}={a + b}."
    else:
        zc, ec, zcap, ecap = rng.choice(CAPITALS)
        zw, ew = rng.choice(WEATHER)
        temp = rng.randint(-5, 35)
        user = f"{zcap}现在天气怎么样？" if lang == "zh" else f"What's the weather like in {ecap} right now?"
        call = {"name": "get_weather", "arguments": {"city": ecap}}
        result = json.dumps({"city": ecap, "weather": ew, "temperature_c": temp})
        final = (f"{zcap}现在{zw}，气温 {temp}°C。" if lang == "zh"
                 else f"It is {ew} in {ecap} right now, {temp}°C.")
    convo = [{"role": "user", "content": user},
             {"role": "assistant", "content": "", "tool_calls": [call]},
             {"role": "tool", "content": result},
             {"role": "assistant", "content": final}]
    return {"conversations": convo, "tools": [CALC_TOOL, WEATHER_TOOL]}


def make_sft(rng, n):
    rows = []
    for i in range(n):
        if i % 40 == 7:
            rows.append(with_tools(rng))
        elif i % 10 == 3:
            rows.append({"conversations": multi_turn(rng)})
        elif i % 10 == 5:
            rows.append({"conversations": with_system(rng)})
        else:
            rows.append({"conversations": single_turn(rng)})
    return rows


def make_dpo(rng, n):
    rows = []
    for _ in range(n):
        lang = "zh" if rng.random() < 0.5 else "en"
        if rng.random() < 0.7:
            a, b = pick_operands(rng)
            q = arithmetic_question(rng, a, b, lang)
            delta = rng.choice([-3, -2, -1, 1, 2, 3, 10])
            wrong = a + b + delta if a + b + delta >= 0 else a + b - delta
            good, bad = arithmetic_answer(a, b, a + b, lang), arithmetic_answer(a, b, wrong, lang)
        else:
            zc, ec, zcap, ecap = rng.choice(CAPITALS)
            other = rng.choice([c for c in CAPITALS if c[0] != zc])
            if lang == "zh":
                q, good, bad = f"{zc}的首都是哪里？", f"{zc}的首都是{zcap}。", f"{zc}的首都是{other[2]}。"
            else:
                q, good, bad = (f"What is the capital of {ec}?", f"The capital of {ec} is {ecap}.",
                                f"The capital of {ec} is {other[3]}.")
        user = {"role": "user", "content": q}
        rows.append({"chosen": [user, {"role": "assistant", "content": good}],
                     "rejected": [user, {"role": "assistant", "content": bad}]})
    return rows


def reasoning_trace(a, b, lang):
    c = a + b
    if lang == "zh":
        if a < 10 and b < 10:
            think = f"题目要求 {a} 加 {b}。从 {a} 开始再数 {b} 个数，得到 {c}。所以答案是 {c}。"
        else:
            ta, oa, tb, ob = a // 10, a % 10, b // 10, b % 10
            think = (f"题目要求 {a} 加 {b}。先加个位：{oa}+{ob}={oa + ob}；再加十位：{ta}+{tb}={ta + tb}，"
                     f"即 {(ta + tb) * 10}。合起来是 {(ta + tb) * 10}+{oa + ob}={c}。")
    else:
        if a < 10 and b < 10:
            think = f"The question asks for {a} plus {b}. Starting at {a} and counting up {b} gives {c}. So the answer is {c}."
        else:
            ta, oa, tb, ob = a // 10, a % 10, b // 10, b % 10
            think = (f"The question asks for {a} plus {b}. Ones: {oa}+{ob}={oa + ob}. Tens: {ta}+{tb}={ta + tb}, "
                     f"that is {(ta + tb) * 10}. Together {(ta + tb) * 10}+{oa + ob}={c}.")
    return f"<think>\n{think}\n</think>\n<answer>\n{c}\n</answer>"


def make_reason(rng, n):
    rows = []
    for _ in range(n):
        lang = "zh" if rng.random() < 0.5 else "en"
        a, b = pick_operands(rng)
        rows.append({"conversations": [{"role": "user", "content": arithmetic_question(rng, a, b, lang)},
                                       {"role": "assistant", "content": reasoning_trace(a, b, lang)}]})
    return rows


def make_rlaif(rng, n):
    rows = []
    for i in range(n):
        lang = "zh" if rng.random() < 0.5 else "en"
        a, b = add_pair(rng, 9) if rng.random() < 0.85 else add_pair(rng, 20)
        convo = [{"role": "user", "content": arithmetic_question(rng, a, b, lang)},
                 {"role": "assistant", "content": str(a + b)}]
        if i % 10 == 0:
            # A few prompts with a system turn so RL sees the same shapes as SFT.
            convo.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)[0]})
        rows.append({"conversations": convo})
    return rows


# ------------------------------------------------------------------------------------------------------------------
# Digit sums with a running-total trace (scripts/demo_grpo_reward.py): its own files, written by that script

SUM_TEMPLATES = ["计算：{}", "求和：\n{}", "Add up:\n{}", "Sum the digits:\n{}"]


def sum_trace(digits):
    """The worked answer for the sum of `digits`: the running totals, comma-separated ("3,8,10,14,21"), then the sum.
    Every total up to 45 is one token of the repo tokenizer and so is every digit, so total k sits at a fixed distance
    from digit k of the question ("3+5+2+4+7" has the same stride 2): each step is one copy at a constant offset plus
    one addition fact. Answering without the trace means adding all the digits in one forward pass."""
    totals = [sum(digits[:i + 1]) for i in range(len(digits))]
    return f"<think>\n{','.join(map(str, totals))}\n</think>\n<answer>\n{totals[-1]}\n</answer>"


def sum_question(rng, digits):
    """A zh or en question that ends with the expression, so the offset from the expression to the reply's trace is
    the same for every template."""
    return rng.choice(SUM_TEMPLATES).format("+".join(map(str, digits)))


def sum_splits(n_digits=5, heldout_sets=150, heldout_prompts=300, split_seed=0):
    """(is_train, heldout): the held-out prompts are `heldout_prompts` digit sequences drawn from the orderings of
    `heldout_sets` multisets of digits; `is_train(seq)` is False for every ordering of those multisets, so no
    held-out sequence, not even reordered, appears in pretraining, SFT or RL."""
    rng = random.Random(split_seed)
    multisets = set()
    while len(multisets) < heldout_sets:
        multisets.add(tuple(sorted(rng.randrange(10) for _ in range(n_digits))))
    held = set()
    ordered = sorted(multisets)
    while len(held) < heldout_prompts:
        seq = list(rng.choice(ordered))
        rng.shuffle(seq)
        held.add(tuple(seq))
    heldout = sorted(held)
    rng.shuffle(heldout)
    return (lambda seq: tuple(sorted(seq)) not in multisets), heldout


def sum_train(is_train, rng, n, n_digits=5):
    """n training sequences (repeats allowed: there are ~10^n of them)."""
    out = []
    while len(out) < n:
        seq = tuple(rng.randrange(10) for _ in range(n_digits))
        if is_train(seq):
            out.append(seq)
    return out


def sum_direct(digits):
    """The reply that answers at once: an empty think block, then the sum (a hybrid-thinking model's reply with
    thinking off). The model must add all the digits in one forward pass."""
    return f"<think>\n\n</think>\n<answer>\n{sum(digits)}\n</answer>"


def sum_rows(seqs, rng, trace=True, trace_share=1.0):
    """SFT/RLAIF conversations: a question, then the reply (trace=True) or the bare sum as the checkable last message
    (trace=False: RL prompts). With trace=True a `trace_share` of the rows, spread evenly (row i has it when
    floor((i + 1) * share) > floor(i * share)), get the worked trace and the others the direct reply (sum_direct)."""
    def reply(i, seq):
        if not trace:
            return str(sum(seq))
        worked = int((i + 1) * trace_share) > int(i * trace_share)
        return sum_trace(seq) if worked else sum_direct(seq)
    return [{"conversations": [{"role": "user", "content": sum_question(rng, seq)},
                               {"role": "assistant", "content": reply(i, seq)}]}
            for i, seq in enumerate(seqs)]


def sum_pretrain(seqs, rng, per_doc=5):
    """Pretraining documents of worked problems, `per_doc` each, from `seqs`, laid out as chat turns (ChatML, as the
    chat template renders them): the trace then sits at the same distance from the question as in a chat reply, so
    the copy offsets learned here are the ones the chat needs (plain "question\ntrace" text puts four tokens fewer in
    between, and one SFT epoch did not re-learn that: docs/notes_stages.md, session 8)."""
    def turn(s):
        return (f"<|im_start|>user\n{sum_question(rng, s)}<|im_end|>\n"
                f"<|im_start|>assistant\n{sum_trace(s)}<|im_end|>")
    return [{"text": "\n".join(turn(s) for s in seqs[i:i + per_doc])}
            for i in range(0, len(seqs) - per_doc + 1, per_doc)]


IDENTITY_Q = [
    ("你是谁？", "zh"), ("你叫什么名字？", "zh"), ("介绍一下你自己。", "zh"), ("你是哪个模型？", "zh"),
    ("谁开发了你？", "zh"), ("你能做什么？", "zh"),
    ("Who are you?", "en"), ("What is your name?", "en"), ("Introduce yourself.", "en"),
    ("Which model are you?", "en"), ("Who made you?", "en"), ("What can you do?", "en"),
]
IDENTITY_A = {
    "zh": ["我是 MiniMind，一个从零训练的小型语言模型，可以回答简单的问题和做简单的加法。",
           "我叫 MiniMind，是一个很小的语言模型。有什么可以帮你的吗？",
           "你好，我是 MiniMind，一个开源的小语言模型，由 MiniMind 项目从零训练而成。"],
    "en": ["I am MiniMind, a small language model trained from scratch. I can answer simple questions and add numbers.",
           "My name is MiniMind. I'm a tiny open-source language model. How can I help?",
           "Hi, I'm MiniMind, a small language model built from scratch by the MiniMind project."],
}


def make_identity(rng, n):
    rows = []
    for _ in range(n):
        q, lang = rng.choice(IDENTITY_Q)
        rows.append({"conversations": [{"role": "user", "content": q},
                                       {"role": "assistant", "content": rng.choice(IDENTITY_A[lang])}]})
    return rows


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {path} ({len(rows)} lines, {path.stat().st_size / 1024:.0f} KB)")


def main():
    parser = argparse.ArgumentParser(description="生成演示数据 / generate the demo datasets")
    parser.add_argument("--out_dir", default=str(HERE), help="输出目录 / output folder (default: dataset/demo)")
    parser.add_argument("--seed", type=int, default=42, help="随机种子 / random seed (same seed -> same files)")
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # One generator per file, so changing one set's size leaves the others byte-identical.
    sets = [("pretrain.jsonl", make_pretrain, 5000), ("sft.jsonl", make_sft, 1600), ("dpo.jsonl", make_dpo, 400),
            ("reason.jsonl", make_reason, 600), ("rlaif.jsonl", make_rlaif, 500),
            ("lora_identity.jsonl", make_identity, 120)]
    for k, (name, fn, n) in enumerate(sets):
        write_jsonl(out / name, fn(random.Random(args.seed * 1000 + k), n))


if __name__ == "__main__":
    main()
