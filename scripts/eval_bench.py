"""Score a checkpoint on C-Eval or CMMLU (multiple choice, next-token log-probabilities of the option letters).

    python scripts/eval_bench.py --weight full_sft --data_dir dataset/ceval-exam              # zero-shot, C-Eval val
    python scripts/eval_bench.py --weight pretrain --data_dir dataset/cmmlu --shots 5 --json cmmlu.json
    python scripts/eval_bench.py --weight full_sft --data_dir dataset/bench_sample/ceval     # the shipped sample
    python scripts/eval_bench.py --load_from ./MiniMind2-hf --data_dir dataset/cmmlu --subjects agronomy --limit 20
    python scripts/eval_bench.py --data_dir dataset/ceval-exam --lm_eval_tasks lm_tasks/    # task files for lm_eval

Model selection is eval_llm.py's (trainer/chat_utils.py): --weight/--save_dir/--lora_weight, sizes from the sidecar,
or --load_from DIR for a transformers folder (e.g. one written by scripts/convert_model.py).

Data (download yourself; nothing is fetched here):
  C-Eval  https://huggingface.co/datasets/ceval/ceval-exam (ceval-exam.zip; also linked from github.com/hkust-nlp/ceval)
          unzip to DIR/{dev,val,test}/{subject}_{split}.csv, columns id,question,A,B,C,D,answer(,explanation).
          The test split has no answers (C-Eval grades it on its website), so the val split is scored.
  CMMLU   https://huggingface.co/datasets/haonan-li/cmmlu (cmmlu_v1_0_1.zip; also github.com/haonan-li/CMMLU)
          unzip to DIR/{dev,test}/{subject}.csv, columns ,Question,A,B,C,D,Answer (first column an unnamed index).
          The test split has answers and is scored.
  --benchmark auto tells them apart by that layout. dataset/bench_sample/{ceval,cmmlu} is a tiny sample in the same
  layout, written for this repo's tests (not taken from either benchmark).

Prompts follow each benchmark's published answer-only evaluation:
  C-Eval  "以下是中国关于{科目}考试的单项选择题，请选出其中的正确答案。\\n\\n" + k dev examples
          "{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\n答案：X\\n\\n" + the question ending in "答案："
  CMMLU   "以下是关于{科目}的单项选择题，请直接给出正确答案的选项。\\n\\n" + k examples "题目：{question}\\nA. ..
          \\n答案是：X\\n\\n" + the question ending in "答案是："
  k = --shots, the first k rows of the subject's dev file. The prediction is the argmax of the log-probabilities of
  the four letters as the next token; no text is generated.
  --template: `raw` feeds that text as is, preceded by the tokenizer's BOS (<|im_start|>, how every pretraining sample
  started); `chat` puts it through the chat template as a conversation (the header opens the first user turn, each
  dev example is a user turn answered by an assistant turn holding the letter, then the question) and ends with the
  generation prompt, so the letter is the assistant's first token. `auto` (default): raw for --weight pretrain* or a
  tokenizer without a chat template, chat for everything else (SFT/DPO/RL models were trained on that format).
  Letter tokens: the token the prompt format implies, i.e. what the tokenizer makes of "答案：A" (or "assistant\\nA")
  after the prompt's own tokens: a bare "A" for this repo's tokenizer, not " A". --letter_variants max also takes
  the space-prefixed and standalone spellings and scores each letter by its best variant (for tokenizers that split
  differently).
  A prompt longer than --max_length loses whole dev examples from the left (the earliest first); with none left it is
  cut from the left, keeping the end of the question; the report says how many were shortened.
  Prompts are sorted by length and run in batches of --batch_size, left-padded with an attention mask (models other
  than MiniMind also get position ids from the mask); only the last position's logits are computed.

Report: accuracy per subject, per category (STEM, Social Science, Humanities, Other; CMMLU also China specific;
C-Eval also Hard = its 8 hardest STEM subjects) and overall, micro (over questions) and macro (mean over subjects),
with random guessing (25%) beside it; the same as JSON (--json), with every prediction.
"""
import argparse
import csv
import inspect
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from trainer.chat_utils import add_device_arg, add_model_args, inference_context, load_model, place_model  # noqa: E402
from trainer.trainer_utils import UserError, atomic_write_text, run_main  # noqa: E402

LETTERS = "ABCD"
RANDOM_GUESS = 0.25
CATEGORY_ORDER = ["STEM", "Social Science", "Humanities", "Other", "China specific", "Hard"]

# C-Eval: subject -> (Chinese name used in the prompt, category), as in C-Eval's subject_mapping.json
# (clinical_medicine has no category there; the paper puts it under Other).
CEVAL_SUBJECTS = {
    "computer_network": ("计算机网络", "STEM"), "operating_system": ("操作系统", "STEM"),
    "computer_architecture": ("计算机组成", "STEM"), "college_programming": ("大学编程", "STEM"),
    "college_physics": ("大学物理", "STEM"), "college_chemistry": ("大学化学", "STEM"),
    "advanced_mathematics": ("高等数学", "STEM"), "probability_and_statistics": ("概率统计", "STEM"),
    "discrete_mathematics": ("离散数学", "STEM"), "electrical_engineer": ("注册电气工程师", "STEM"),
    "metrology_engineer": ("注册计量师", "STEM"), "high_school_mathematics": ("高中数学", "STEM"),
    "high_school_physics": ("高中物理", "STEM"), "high_school_chemistry": ("高中化学", "STEM"),
    "high_school_biology": ("高中生物", "STEM"), "middle_school_mathematics": ("初中数学", "STEM"),
    "middle_school_biology": ("初中生物", "STEM"), "middle_school_physics": ("初中物理", "STEM"),
    "middle_school_chemistry": ("初中化学", "STEM"), "veterinary_medicine": ("兽医学", "STEM"),
    "college_economics": ("大学经济学", "Social Science"), "business_administration": ("工商管理", "Social Science"),
    "marxism": ("马克思主义基本原理", "Social Science"),
    "mao_zedong_thought": ("毛泽东思想和中国特色社会主义理论体系概论", "Social Science"),
    "education_science": ("教育学", "Social Science"), "teacher_qualification": ("教师资格", "Social Science"),
    "high_school_politics": ("高中政治", "Social Science"), "high_school_geography": ("高中地理", "Social Science"),
    "middle_school_politics": ("初中政治", "Social Science"),
    "middle_school_geography": ("初中地理", "Social Science"),
    "modern_chinese_history": ("近代史纲要", "Humanities"),
    "ideological_and_moral_cultivation": ("思想道德修养与法律基础", "Humanities"), "logic": ("逻辑学", "Humanities"),
    "law": ("法学", "Humanities"), "chinese_language_and_literature": ("中国语言文学", "Humanities"),
    "art_studies": ("艺术学", "Humanities"), "professional_tour_guide": ("导游资格", "Humanities"),
    "legal_professional": ("法律职业资格", "Humanities"), "high_school_chinese": ("高中语文", "Humanities"),
    "high_school_history": ("高中历史", "Humanities"), "middle_school_history": ("初中历史", "Humanities"),
    "civil_servant": ("公务员", "Other"), "sports_science": ("体育学", "Other"),
    "plant_protection": ("植物保护", "Other"),
    "basic_medicine": ("基础医学", "Other"), "clinical_medicine": ("临床医学", "Other"),
    "urban_and_rural_planner": ("注册城乡规划师", "Other"), "accountant": ("注册会计师", "Other"),
    "fire_engineer": ("注册消防工程师", "Other"),
    "environmental_impact_assessment_engineer": ("环境影响评价工程师", "Other"),
    "tax_accountant": ("税务师", "Other"), "physician": ("医师资格", "Other"),
}
# C-Eval Hard (the paper's subset of advanced mathematics and sciences)
CEVAL_HARD = {"advanced_mathematics", "discrete_mathematics", "probability_and_statistics", "college_chemistry",
              "college_physics", "high_school_mathematics", "high_school_chemistry", "high_school_physics"}

# CMMLU: subject -> (Chinese name, category, China-specific), from CMMLU's categories.py (its sub-categories folded
# into the four main categories; "China specific" is an extra, overlapping category).
CMMLU_SUBJECTS = {
    "agronomy": ("农学", "Other", False), "anatomy": ("解剖学", "STEM", False),
    "ancient_chinese": ("古汉语", "Social Science", True), "arts": ("艺术学", "Humanities", False),
    "astronomy": ("天文学", "STEM", False), "business_ethics": ("商业伦理", "Social Science", False),
    "chinese_civil_service_exam": ("中国公务员考试", "Social Science", True),
    "chinese_driving_rule": ("中国驾驶规则", "Other", True),
    "chinese_food_culture": ("中国饮食文化", "Social Science", True),
    "chinese_foreign_policy": ("中国外交政策", "Social Science", True),
    "chinese_history": ("中国历史", "Humanities", True), "chinese_literature": ("中国文学", "Humanities", True),
    "chinese_teacher_qualification": ("中国教师资格", "Social Science", True),
    "clinical_knowledge": ("临床知识", "Other", False), "college_actuarial_science": ("大学精算学", "STEM", False),
    "college_education": ("大学教育学", "Social Science", False),
    "college_engineering_hydrology": ("大学工程水文学", "STEM", False),
    "college_law": ("大学法律", "Humanities", False),
    "college_mathematics": ("大学数学", "STEM", False), "college_medical_statistics": ("大学医学统计", "STEM", False),
    "college_medicine": ("大学医学", "Other", False), "computer_science": ("计算机科学", "STEM", False),
    "computer_security": ("计算机安全", "Other", False), "conceptual_physics": ("概念物理学", "STEM", False),
    "construction_project_management": ("建设工程管理", "Other", True),
    "economics": ("经济学", "Social Science", False), "education": ("教育学", "Social Science", False),
    "electrical_engineering": ("电气工程", "STEM", False), "elementary_chinese": ("小学语文", "Social Science", True),
    "elementary_commonsense": ("小学常识", "Other", True),
    "elementary_information_and_technology": ("小学信息技术", "Other", False),
    "elementary_mathematics": ("初等数学", "STEM", False), "ethnology": ("民族学", "Social Science", True),
    "food_science": ("食品科学", "Other", False), "genetics": ("遗传学", "STEM", False),
    "global_facts": ("全球事实", "Humanities", False), "high_school_biology": ("高中生物", "STEM", False),
    "high_school_chemistry": ("高中化学", "STEM", False),
    "high_school_geography": ("高中地理", "Social Science", False),
    "high_school_mathematics": ("高中数学", "STEM", False), "high_school_physics": ("高中物理学", "STEM", False),
    "high_school_politics": ("高中政治", "Social Science", True), "human_sexuality": ("人类性行为", "Other", False),
    "international_law": ("国际法学", "Humanities", False), "journalism": ("新闻学", "Social Science", False),
    "jurisprudence": ("法理学", "Humanities", False), "legal_and_moral_basis": ("法律与道德基础", "Other", False),
    "logical": ("逻辑学", "Humanities", False), "machine_learning": ("机器学习", "STEM", False),
    "management": ("管理学", "Social Science", False), "marketing": ("市场营销", "Social Science", False),
    "marxist_theory": ("马克思主义理论", "Humanities", False), "modern_chinese": ("现代汉语", "Social Science", True),
    "nutrition": ("营养学", "Other", False), "philosophy": ("哲学", "Humanities", False),
    "professional_accounting": ("专业会计", "Social Science", False),
    "professional_law": ("专业法学", "Humanities", False),
    "professional_medicine": ("专业医学", "Other", False),
    "professional_psychology": ("专业心理学", "Social Science", False),
    "public_relations": ("公共关系", "Social Science", False), "security_study": ("安全研究", "Social Science", False),
    "sociology": ("社会学", "Social Science", False), "sports_science": ("体育学", "Other", False),
    "traditional_chinese_medicine": ("中医中药", "Other", True), "virology": ("病毒学", "STEM", False),
    "world_history": ("世界历史", "Humanities", False), "world_religions": ("世界宗教", "Humanities", False),
}


@dataclass
class Bench:
    """What differs between the two benchmarks: file layout, scored split and prompt wording."""
    name: str
    scored_split: str       # the split that has answers
    header: str             # "{zh}" = the subject's Chinese name
    question_prefix: str
    answer_cue: str

    def files(self, data_dir: Path, split: str) -> dict[str, Path]:
        """subject -> CSV file of that split."""
        folder = data_dir / split
        if self.name == "ceval":
            suffix = f"_{split}.csv"
            return {p.name[:-len(suffix)]: p for p in sorted(folder.glob(f"*{suffix}"))}
        return {p.stem: p for p in sorted(folder.glob("*.csv"))}

    def subject_info(self, subject: str) -> tuple[str, list[str]]:
        """(Chinese name, categories). A subject the maps do not know keeps its file name and no category."""
        if self.name == "ceval" and subject in CEVAL_SUBJECTS:
            zh, cat = CEVAL_SUBJECTS[subject]
            return zh, [cat] + (["Hard"] if subject in CEVAL_HARD else [])
        if self.name == "cmmlu" and subject in CMMLU_SUBJECTS:
            zh, cat, china = CMMLU_SUBJECTS[subject]
            return zh, [cat] + (["China specific"] if china else [])
        return subject.replace("_", " "), []


BENCHES = {
    "ceval": Bench("ceval", "val", "以下是中国关于{zh}考试的单项选择题，请选出其中的正确答案。\n\n", "", "答案："),
    "cmmlu": Bench("cmmlu", "test", "以下是关于{zh}的单项选择题，请直接给出正确答案的选项。\n\n", "题目：", "答案是："),
}


@dataclass
class Subject:
    name: str
    zh: str
    categories: list[str]
    items: list[dict]                    # scored questions: question, A-D, answer
    dev: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- data
def detect_benchmark(data_dir: Path) -> str:
    if any((data_dir / "val").glob("*_val.csv")):
        return "ceval"
    if any(p for p in (data_dir / "test").glob("*.csv") if not p.name.endswith("_test.csv")):
        return "cmmlu"
    nested = [d.name for d in (data_dir / "ceval", data_dir / "cmmlu") if d.is_dir()]
    hint = f" (it has {', '.join(nested)}/: pass --data_dir {data_dir / nested[0]})" if nested else ""
    raise UserError(f"{data_dir} is neither C-Eval's layout (val/{{subject}}_val.csv) nor CMMLU's "
                    f"(test/{{subject}}.csv){hint}; see the download notes at the top of scripts/eval_bench.py")


def read_questions(path: Path, need_answer: bool) -> list[dict]:
    """Rows of a C-Eval/CMMLU CSV as {question, A, B, C, D, answer}; column names matched case-insensitively."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = [h.strip().lower() for h in next(reader, [])]
        wanted = ["question", *"abcd"] + (["answer"] if need_answer else [])
        missing = [w for w in wanted if w not in header]
        if missing:
            raise UserError(f"{path}: header {header} lacks column(s) {missing}; expected C-Eval's "
                            "id,question,A,B,C,D,answer or CMMLU's ,Question,A,B,C,D,Answer")
        col = {w: header.index(w) for w in wanted}
        rows = []
        for rec in reader:
            if not any(cell.strip() for cell in rec):
                continue
            if len(rec) != len(header):
                raise UserError(f"{path} line {reader.line_num}: {len(rec)} fields, the header has {len(header)}; "
                                "fix the quoting of that row")
            row = {"question": rec[col["question"]].strip(), "answer": None}
            row.update({L: rec[col[L.lower()]].strip() for L in LETTERS})
            if need_answer:
                row["answer"] = rec[col["answer"]].strip().upper()
                if row["answer"] not in LETTERS:
                    raise UserError(f"{path} line {reader.line_num}: answer {rec[col['answer']]!r} is not one of "
                                    "A, B, C, D")
            rows.append(row)
    return rows


def load_benchmark(data_dir: Path, bench: Bench, subjects: list[str] | None, limit: int | None,
                   shots: int) -> list[Subject]:
    files = bench.files(data_dir, bench.scored_split)
    if not files:
        raise UserError(f"no {bench.scored_split} files in {data_dir / bench.scored_split}")
    if subjects:
        unknown = [s for s in subjects if s not in files]
        if unknown:
            raise UserError(f"subject(s) {unknown} not in {data_dir / bench.scored_split}; "
                            f"available: {', '.join(files)}")
        files = {s: files[s] for s in subjects}
    dev_files = bench.files(data_dir, "dev")
    out = []
    for name, path in files.items():
        zh, cats = bench.subject_info(name)
        if not cats:
            print(f"note: {name} is not a {bench.name} subject this script knows; it counts in the overall score only")
        items = read_questions(path, need_answer=True)[:limit]
        if not items:
            raise UserError(f"{path} has no questions")
        dev = []
        if shots > 0:
            if name not in dev_files:
                raise UserError(f"--shots {shots} needs the dev file of {name} in {data_dir / 'dev'}")
            dev = read_questions(dev_files[name], need_answer=True)[:shots]
            if len(dev) < shots:
                print(f"note: {name} has only {len(dev)} dev examples; using {len(dev)} shots")
        out.append(Subject(name, zh, cats, items, dev))
    return out


# ---------------------------------------------------------------------------------------------------- prompts
def format_question(bench: Bench, row: dict) -> str:
    options = "".join(f"\n{L}. {row[L]}" for L in LETTERS)
    return f"{bench.question_prefix}{row['question']}{options}\n{bench.answer_cue}"


def render_prompt(bench: Bench, subject: Subject, shots: list[dict], row: dict, template: str, tokenizer=None,
                  empty_think: bool = False) -> str:
    """The prompt text: header, the dev examples with their answers, then the question ending in the answer cue."""
    header = bench.header.format(zh=subject.zh)
    if template == "raw":
        return header + "".join(f"{format_question(bench, s)}{s['answer']}\n\n" for s in shots) + \
            format_question(bench, row)
    messages = []
    for s in shots:
        messages += [{"role": "user", "content": format_question(bench, s)},
                     {"role": "assistant", "content": s["answer"]}]
    messages.append({"role": "user", "content": format_question(bench, row)})
    messages[0]["content"] = header + messages[0]["content"]
    extra = {"enable_thinking": False} if empty_think else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)


def encode(tokenizer, text: str, template: str, bos: bool) -> list[int]:
    """Token ids of a prompt. Raw prompts start with BOS when asked and the tokenizer does not add it itself."""
    ids = tokenizer(text, add_special_tokens=template == "raw").input_ids
    if template == "raw" and bos and tokenizer.bos_token_id is not None and ids[:1] != [tokenizer.bos_token_id]:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def build_prompt(tokenizer, bench: Bench, subject: Subject, row: dict, shots: list[dict], template: str,
                 max_length: int, bos: bool, empty_think: bool) -> tuple[list[int], bool]:
    """(ids, shortened): drop dev examples from the left until the prompt fits; then cut tokens from the left."""
    for first in range(len(shots) + 1):
        ids = encode(tokenizer, render_prompt(bench, subject, shots[first:], row, template, tokenizer, empty_think),
                     template, bos)
        if len(ids) <= max_length:
            return ids, first > 0
    keep_bos = template == "raw" and bos and ids[:1] == [tokenizer.bos_token_id]
    return (ids[:1] + ids[len(ids) - max_length + 1:]) if keep_bos else ids[-max_length:], True


def letter_token_ids(tokenizer, prompt_text: str, template: str, variants: str) -> list[list[int]]:
    """For each letter, the token id(s) that score it. 'exact': the token that follows the prompt's own tokens when
    the letter is appended to the prompt's last characters (what "答案：A" tokenizes to). 'max': also the standalone
    and space-prefixed spellings (each letter scored by its best variant)."""
    tail = prompt_text[-8:]
    base = tokenizer(tail, add_special_tokens=False).input_ids
    out = []
    for L in LETTERS:
        ids = set()
        full = tokenizer(tail + L, add_special_tokens=False).input_ids
        if full[:len(base)] == base and len(full) == len(base) + 1:
            ids.add(full[-1])
        if variants == "max" or not ids:
            for spelling in (L, " " + L):
                one = tokenizer(spelling, add_special_tokens=False).input_ids
                if len(one) == 1:
                    ids.add(one[0])
        if not ids:
            raise UserError(f"the tokenizer has no single token for the letter {L} after {tail!r}; "
                            "letter scoring needs one")
        out.append(sorted(ids))
    return out


# ---------------------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def letter_logprobs(model, prompts: list[list[int]], letter_ids: list[list[int]], batch_size: int,
                    device: torch.device, pad_id: int = 0) -> torch.Tensor:
    """[N, 4] log-probabilities of the letters as the next token after each prompt. Prompts run longest first in
    left-padded batches; only the last position's logits are computed."""
    config = getattr(model, "config", None)
    derive_positions = getattr(config, "model_type", None) != "minimind"  # MiniMind derives them from the mask
    keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = torch.empty(len(prompts), len(LETTERS))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]):] = 1
        ids, mask = ids.to(device), mask.to(device)
        kwargs = {"logits_to_keep": 1} if keep_last else {}
        if not bool(mask.all()):  # without padding no mask is passed: the model's plain causal path is faster
            kwargs["attention_mask"] = mask
            if derive_positions:
                kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        with inference_context(model):
            logits = model(input_ids=ids, **kwargs).logits[:, -1].float()
        logp = logits.log_softmax(-1).cpu()
        for j, variants in enumerate(letter_ids):
            out[idx, j] = logp[:, variants].max(-1).values
    return out


def summarize(subjects: list[Subject], preds: dict[str, str], logprobs: dict[str, list] | None = None) -> dict:
    """Per-subject, per-category and overall accuracy: micro = over questions, macro = mean over subjects.
    preds: subject -> one letter per question; logprobs (optional, kept in the JSON): subject -> [A, B, C, D] each."""
    per_subject = {}
    for s in subjects:
        correct = sum(p == row["answer"] for p, row in zip(preds[s.name], s.items))
        per_subject[s.name] = {"zh": s.zh, "categories": s.categories, "correct": correct, "total": len(s.items),
                               "acc": correct / len(s.items), "preds": preds[s.name],
                               "answers": "".join(row["answer"] for row in s.items)}
        if logprobs is not None:
            per_subject[s.name]["letter_logprobs"] = logprobs[s.name]

    def group(names):
        rows = [per_subject[n] for n in names]
        correct, total = sum(r["correct"] for r in rows), sum(r["total"] for r in rows)
        return {"subjects": len(rows), "correct": correct, "total": total, "acc": correct / total,
                "macro_acc": sum(r["acc"] for r in rows) / len(rows)}

    categories = {}
    for cat in CATEGORY_ORDER:
        names = [s.name for s in subjects if cat in s.categories]
        if names:
            categories[cat] = group(names)
    return {"subjects": per_subject, "categories": categories, "overall": group([s.name for s in subjects])}


def print_table(result: dict) -> None:
    pct = lambda x: f"{100 * x:6.2f}"  # noqa: E731
    print(f"\n{result['benchmark']} ({result['split']} split, {result['shots']}-shot, {result['template']} prompts)")
    print(f"{'subject':42s} {'n':>5s} {'acc %':>7s}  categories")
    for name, r in result["subjects"].items():
        print(f"{name:42s} {r['total']:5d} {pct(r['acc'])}   {', '.join(r['categories']) or '-'}  {r['zh']}")
    print(f"\n{'category':42s} {'n':>5s} {'acc %':>7s} {'macro %':>8s} {'random %':>9s}")
    rows = list(result["categories"].items()) + [("Overall", result["overall"])]
    for name, r in rows:
        print(f"{name:42s} {r['total']:5d} {pct(r['acc'])}  {pct(r['macro_acc'])}  {pct(RANDOM_GUESS)}")
    print(f"(acc = over questions; macro = mean over subjects; random guessing = {100 * RANDOM_GUESS:.0f}%)")


# ---------------------------------------------------------------------------------------------------- lm_eval
def write_lm_eval_tasks(out_dir: Path, data_dir: Path, bench: Bench, subjects: list[Subject]) -> None:
    """lm-evaluation-harness task files with this script's raw prompts (description = header, "答案：" directly
    followed by the letter, examples separated by a blank line), reading JSONL copies of the questions written
    beside them exactly as this script reads the CSVs (all text, stripped), so lm_eval needs no hub access."""
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    options = "".join(f"\\n{L}. {{{{{L}}}}}" for L in LETTERS)
    dev_files = bench.files(data_dir, "dev")
    names = []
    for s in subjects:
        task = f"minimind_{bench.name}_{s.name}"
        names.append(task)
        splits = {"scored": s.items}
        if s.name in dev_files:
            splits["dev"] = read_questions(dev_files[s.name], need_answer=True)
        lines = [f"task: {task}", "dataset_path: json", "dataset_kwargs:", "  data_files:"]
        for split, rows in splits.items():
            path = out_dir / "data" / f"{bench.name}_{s.name}_{split}.jsonl"
            atomic_write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), str(path))
            lines.append(f"    {split}: {json.dumps(str(path.resolve()))}")
        lines.append("test_split: scored")
        if "dev" in splits:
            lines += ["fewshot_split: dev", "fewshot_config:", "  sampler: first_n"]
        lines += ["output_type: multiple_choice",
                  f"description: {json.dumps(bench.header.format(zh=s.zh), ensure_ascii=False)}",
                  f'doc_to_text: "{bench.question_prefix}{{{{question}}}}{options}\\n{bench.answer_cue}"',
                  'doc_to_choice: ["A", "B", "C", "D"]', "doc_to_target: \"{{['A', 'B', 'C', 'D'].index(answer)}}\"",
                  'target_delimiter: ""', 'fewshot_delimiter: "\\n\\n"',
                  "metric_list:", "  - metric: acc", "    aggregation: mean", "    higher_is_better: true",
                  "metadata:", "  version: 1.0"]
        atomic_write_text("\n".join(lines) + "\n", str(out_dir / f"{task}.yaml"))
    group = [f"group: minimind_{bench.name}", "task:", *[f"  - {t}" for t in names], "aggregate_metric_list:",
             "  - metric: acc", "    aggregation: mean", "    weight_by_size: true", "metadata:", "  version: 1.0"]
    atomic_write_text("\n".join(group) + "\n", str(out_dir / f"_minimind_{bench.name}.yaml"))
    print(f"wrote {len(names)} task files + group minimind_{bench.name} to {out_dir}\n"
          f"run: lm_eval --model hf --model_args pretrained=HF_DIR,trust_remote_code=True,add_bos_token=True "
          f"--include_path {out_dir} --tasks minimind_{bench.name} --num_fewshot 0")


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser(description="C-Eval / CMMLU multiple-choice accuracy of a checkpoint",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.add_argument("--data_dir", type=str, required=True, help="C-Eval or CMMLU folder (dev/ val/ test/ CSVs)")
    p.add_argument("--benchmark", type=str, default="auto", choices=["auto", "ceval", "cmmlu"],
                   help="auto = from the folder layout")
    p.add_argument("--shots", type=int, default=0, help="k-shot: the first k dev examples of each subject")
    p.add_argument("--subjects", type=str, nargs="*", default=None, help="only these subjects (file names)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions of each subject")
    p.add_argument("--template", type=str, default="auto", choices=["auto", "raw", "chat"],
                   help="raw text or the chat template; auto = raw for --weight pretrain*, else chat")
    p.add_argument("--empty_think", action="store_true",
                   help="chat: end the prompt with an empty <think></think> block (reasoning models answer at once)")
    p.add_argument("--bos", type=int, default=1, choices=[0, 1], help="raw: start with the tokenizer's BOS token")
    p.add_argument("--letter_variants", type=str, default="exact", choices=["exact", "max"],
                   help="exact = the letter token the prompt implies; max = best of its spellings (A, ' A')")
    p.add_argument("--max_length", type=int, default=2048,
                   help="longest prompt in tokens (capped at the model's max_position_embeddings)")
    p.add_argument("--batch_size", type=int, default=16, help="prompts per forward pass")
    add_device_arg(p)
    p.add_argument("--json", type=str, default=None, help="write the full result (with every prediction) here")
    p.add_argument("--lm_eval_tasks", type=str, default=None,
                   help="write lm-evaluation-harness task files for --data_dir to this folder and exit")
    args = p.parse_args(argv)

    data_dir = Path(args.data_dir).expanduser().resolve()
    if not data_dir.is_dir():
        raise UserError(f"--data_dir {data_dir} not found; download C-Eval or CMMLU first "
                        "(see the top of scripts/eval_bench.py) or use dataset/bench_sample/ceval")
    if args.shots < 0 or args.batch_size < 1 or args.max_length < 8:
        raise UserError("--shots must be >= 0, --batch_size >= 1 and --max_length >= 8")
    bench = BENCHES[detect_benchmark(data_dir) if args.benchmark == "auto" else args.benchmark]
    subjects = load_benchmark(data_dir, bench, args.subjects, args.limit, args.shots)
    if args.lm_eval_tasks:
        write_lm_eval_tasks(Path(args.lm_eval_tasks), data_dir, bench, subjects)
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda but CUDA is not available; pass --device cpu")

    model, tokenizer = load_model(args)
    model = place_model(model, args.device, args.dtype)
    template = args.template
    if template == "auto":
        base = args.load_from == "model" and args.weight.startswith("pretrain")
        template = "raw" if base or not getattr(tokenizer, "chat_template", None) else "chat"
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise UserError("--template chat but the tokenizer has no chat template; pass --template raw")
    max_length = min(args.max_length, getattr(model.config, "max_position_embeddings", None) or args.max_length)

    t0 = time.time()
    prompts, owners, shortened = [], [], 0
    for s in subjects:
        for row in s.items:
            ids, cut = build_prompt(tokenizer, bench, s, row, s.dev, template, max_length, bool(args.bos),
                                    args.empty_think)
            prompts.append(ids)
            owners.append(s.name)
            shortened += cut
    probe = render_prompt(bench, subjects[0], [], subjects[0].items[0], template, tokenizer, args.empty_think)
    letter_ids = letter_token_ids(tokenizer, probe, template, args.letter_variants)
    t1 = time.time()
    logp = letter_logprobs(model, prompts, letter_ids, args.batch_size, torch.device(args.device),
                           tokenizer.pad_token_id or 0)
    if torch.device(args.device).type == "cuda":
        torch.cuda.synchronize()
    t2 = time.time()
    preds, scores = {s.name: "" for s in subjects}, {s.name: [] for s in subjects}
    for name, k, row in zip(owners, logp.argmax(-1).tolist(), logp.tolist()):
        preds[name] += LETTERS[k]
        scores[name].append([round(x, 4) for x in row])

    result = {"benchmark": bench.name, "split": bench.scored_split, "data_dir": str(data_dir), "shots": args.shots,
              "template": template, "model": args.load_from if args.load_from != "model" else
              f"{args.save_dir}/{args.weight}" + (f" + LoRA {args.lora_weight}" if args.lora_weight else ""),
              "letter_token_ids": dict(zip(LETTERS, letter_ids)), "max_length": max_length,
              "prompts_shortened": shortened, "random_guess": RANDOM_GUESS, **summarize(subjects, preds, scores)}
    n_tokens = sum(map(len, prompts))
    result["speed"] = {"questions": len(prompts), "prompt_tokens": n_tokens, "prepare_s": round(t1 - t0, 3),
                       "forward_s": round(t2 - t1, 3), "questions_per_s": round(len(prompts) / max(t2 - t1, 1e-9), 2),
                       "tokens_per_s": round(n_tokens / max(t2 - t1, 1e-9), 1), "batch_size": args.batch_size,
                       "device": args.device}
    print_table(result)
    sp = result["speed"]
    print(f"{sp['questions']} questions ({sp['prompt_tokens']} prompt tokens, {shortened} shortened to "
          f"{max_length}) in {sp['forward_s']:.2f}s: {sp['questions_per_s']:.1f} questions/s, "
          f"{sp['tokens_per_s']:.0f} tokens/s on {args.device} (batch {args.batch_size}; prompts built in "
          f"{sp['prepare_s']:.2f}s)")
    if args.json:
        atomic_write_text(json.dumps(result, ensure_ascii=False), str(Path(args.json).resolve()))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    run_main(main, interrupted="(interrupted)")  # nothing to save: not the training scripts' message
