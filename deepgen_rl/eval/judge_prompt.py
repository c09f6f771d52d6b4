"""The UniGenBench judge's question for one image, and the parser of its answer.

The judge (UniGenBench-EvalModel) expects, with the image, a text that gives the generation prompt in 「」, the
prompt's test points ("checkpoints") as a Python list literal, a short definition of each test point, the
prompt-specific description of each, and the answer format

    <analysis>[one string per test point]</analysis>
    <score>[0 or 1 per test point]</score>

The fields, their order and the answer tags follow the benchmark's evaluation protocol so the judge sees the
structure it was trained on; the wording and the definitions below are our own.
"""

from __future__ import annotations

import ast
import re
from typing import Optional

from deepgen_rl.eval.dataset import BenchPrompt, Language

# One-line definitions of the benchmark's test points, in our words. Unknown test points get a fallback line.
DEFINITIONS_EN = {
    "Relationship - Comparison": "how two entities compare on some attribute (bigger, older, brighter, ...)",
    "Relationship - Composition": "one entity is built or made out of other entities",
    "Relationship - Inclusion": "an entity sits inside a container, which may be flat (a picture on a wall)",
    "Relationship - Similarity": "different entities that resemble each other in some way",
    "Compound - Imagination": "a scene that could not happen in reality",
    "Compound - Feature Matching": "several entities, each with its own distinct attributes",
    "Attribute - Size": "size, height, length, thickness or width of the subject",
    "Attribute - Expression": "a facial expression that shows a clear emotion",
    "Attribute - Quantity": "the exact number of items, especially three or more",
    "Attribute - Material": "what things are made of and how their surface looks",
    "Attribute - Color": "the colors of the entities",
    "Attribute - Shape": "the shapes of the entities",
    "Entity Layout - Two-Dimensional Space": "where entities are placed relative to each other in the picture plane",
    "Entity Layout - Three-Dimensional Space": "where entities are placed relative to each other in depth",
    "Action - Full-body (Character/Anthropomorphic)": "a whole-body action of a person or humanlike character",
    "Action - Hand (Character/Anthropomorphic)": "a hand action, with hands and fingers complete and undistorted",
    "Action - Animal": "an action performed by an animal",
    "Action - Contact Interaction": "entities that touch or physically act on each other",
    "Action - Non-contact Interaction": "entities that interact without touching (e.g. looking at each other)",
    "Action - State": "an ongoing state of an entity, usually given by a verb",
    "Grammar - Negation": "something the prompt says is absent or not the case",
    "Grammar - Pronoun Reference": "which entity a pronoun in the prompt refers to",
    "Grammar - Consistency": "an attribute that several entities share",
    "World Knowledge": "well-known people, places, buildings, domain facts or popular expressions",
    "Style": "the artistic, photographic or design style, or the named artist",
    "Text Generation": "the exact text to be rendered, with nothing missing and nothing added",
    "Logical Reasoning": "what the prompt implies once its intent is reasoned through",
}

DEFINITIONS_ZH = {
    "关系-比较关系": "两个实体在某个属性上的比较",
    "关系-构成关系": "一个实体由其他一种或多种实体组成",
    "关系-包含关系": "实体位于容器之中，容器也可以是平面（如墙上的画）",
    "关系-相似关系": "不同实体之间在某方面彼此相像",
    "复合考点-想象力": "现实中不可能出现的场景",
    "复合考点-不同实体特征匹配": "多个实体各自具有不同的属性特征",
    "实体布局-三维空间": "实体在纵深方向上的相对位置",
    "实体布局-二维空间": "实体在画面平面内的相对位置",
    "属性-大小": "主体的大小、高低、长短、粗细或宽窄",
    "属性-表情": "体现明确情绪的面部表情",
    "属性-数量": "物体的准确数量，尤其是三个及以上",
    "属性-材质": "物体的材质与表面质感",
    "动作-人物/拟人全身动作": "人物或拟人角色的全身动作",
    "动作-人物/拟人手部动作": "手部动作，手与手指完整且不变形",
    "动作-动物动作": "动物做出的动作",
    "动作-实体间有接触互动": "实体之间有身体接触的互动",
    "动作-实体间无接触互动": "实体之间没有接触的互动（如对视）",
    "动作-状态": "实体持续的状态，通常由动词表达",
    "语法-否定": "提示词中说明不存在或不是的内容",
    "语法-代词指代": "提示词中代词所指的实体",
    "语法-统一性": "多个实体共有的属性",
    "世界知识": "知名人物、地点、建筑、领域常识或流行语",
    "风格": "艺术、绘画、摄影或设计风格，或指定的艺术家",
    "逻辑推理": "理解提示词意图并推理后应呈现的内容",
    "文本生成": "需要准确渲染的文字，不缺字、不多字",
}

TEMPLATE_EN = """Check how well the attached generated image follows its generation prompt, one test point at a time.

Generation prompt: 「{prompt}」
Test points: {checkpoints}
{definitions}
{descriptions}

Step 1. For each test point, in order, look at the image and analyse whether it shows what that test point asks
for in this prompt. Judge only what is visible; do not guess at hidden details or backstory, and treat anything
you cannot clearly verify as not satisfied.
Step 2. Give each test point a score of 1 if the image satisfies it and 0 otherwise.

Answer in exactly this format, with one list entry per test point, in the order given above:

<description>
    <prompt>{prompt}</prompt>
    <checkpoint>{checkpoints}</checkpoint>
    <analysis>[a string with your Step 1 analysis for each test point]</analysis>
    <score>[0 or 1 for each test point]</score>
</description>
"""

TEMPLATE_ZH = """请逐个考点检查所附生成图像是否符合其生成提示词。

生成提示词：「{prompt}」
考点：{checkpoints}
{definitions}
{descriptions}

第一步：按顺序针对每个考点观察图像，分析图像是否呈现了该考点在这条提示词中的要求。只依据图像中可见的内容判断，不要推测看不到的细节或背景故事；无法明确确认的内容视为不满足。
第二步：图像满足该考点记 1 分，否则记 0 分。

请严格按以下格式回答，列表中每个考点一项，顺序与上面给出的考点一致：

<description>
    <prompt>{prompt}</prompt>
    <checkpoint>{checkpoints}</checkpoint>
    <analysis>[每个考点第一步分析的字符串]</analysis>
    <score>[每个考点的 0 或 1]</score>
</description>
"""

_LABELS = {
    "en": ("What each test point means:「", "What each test point requires in this prompt:「", "(no definition)"),
    "zh": ("考点含义：「", "各考点在本提示词中的要求：「", "（无定义）"),
}
_SCORE_TAG = re.compile(r"<score>(.*?)</score>", re.DOTALL)


def render_judge_prompt(item: BenchPrompt, language: Language) -> str:
    """The text sent with one image: the prompt, its test points, their definitions and descriptions."""
    definitions_table = DEFINITIONS_ZH if language == "zh" else DEFINITIONS_EN
    template = TEMPLATE_ZH if language == "zh" else TEMPLATE_EN
    definitions_label, descriptions_label, undefined = _LABELS[language]
    definitions = definitions_label + "".join(
        f"\n{point}: {definitions_table.get(point, undefined)}" for point in item.test_points) + "\n」"
    descriptions = descriptions_label + "".join(
        f"\n{point}: {text}" for point, text in zip(item.test_points, item.test_point_descriptions)) + "\n」"
    # str.format would trip over braces inside prompts; substitute the fields one by one instead.
    fields = {"{prompt}": item.prompt, "{checkpoints}": repr(list(item.test_points)),
              "{definitions}": definitions, "{descriptions}": descriptions}
    return re.sub("|".join(re.escape(key) for key in fields), lambda match: fields[match.group(0)], template)


class JudgeReplyError(ValueError):
    """A judge reply without a usable score list (missing tag, not a list, not 0/1, wrong length)."""


def parse_judge_scores(text: Optional[str], num_test_points: int) -> list[int]:
    """The 0/1 scores of ``<score>[...]</score>`` (the last such tag); JudgeReplyError if unusable.

    A list whose length differs from the number of test points is unusable
    (docs/upstream_compatibility.md#eval-yaml-and-unigenbench-csv): the scores
    cannot be matched to test points, so the reply is a failure, never padded or truncated.
    """
    if not text:
        raise JudgeReplyError("empty reply")
    tags = _SCORE_TAG.findall(text)
    if not tags:
        raise JudgeReplyError(f"no <score>...</score> in the reply (ends with {text[-200:]!r})")
    body = tags[-1].strip()
    try:
        values = ast.literal_eval(body)  # literals only: safe on untrusted text
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise JudgeReplyError(f"<score> is not a list literal: {body[:200]!r}") from None
    if not isinstance(values, (list, tuple)):
        raise JudgeReplyError(f"<score> is not a list: {body[:200]!r}")
    scores = [_binary(value, body) for value in values]
    if len(scores) != num_test_points:
        raise JudgeReplyError(f"<score> has {len(scores)} entries for {num_test_points} test points: {body[:200]!r}")
    return scores


def _binary(value: object, body: str) -> int:
    """0 or 1 from an int, a float equal to one of them or a quoted digit; anything else (bools too) is rejected."""
    if isinstance(value, str) and value.strip() in ("0", "1"):
        return int(value.strip())
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value in (0, 1):
        return int(value)
    raise JudgeReplyError(f"<score> entries must be 0 or 1; got {value!r} in {body[:200]!r}")
