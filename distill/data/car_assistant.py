"""Bilingual (English / Chinese) in-car command data: request -> one tool call as compact JSON.

Deterministic and seeded. Four splits, built so that each one measures something different:

- ``train`` / ``validation``: training phrasings ("cores") with slot values from the training pools.
- ``test``: training phrasings and training values, but every (phrasing, primary value) pair is one
  that training never shows together (a hash of the pair reserves it). In distribution: gated.
- ``heldout``: what users judge a student by, requests it never saw, in three parts (``Example.part``):
  ``values`` (training phrasings, open values from held-out pools: contact names, destinations, artists
  and message texts whose every part never occurs in training, a quarter of them in the other script:
  Latin names in Chinese requests and the reverse), ``phrasing`` (phrasings no training request uses,
  training values) and ``both``. Disjoint from training by construction: the held-out pools keep only
  parts none of whose English words or Chinese characters occur in any training string
  (``heldout_vocabulary``), and no held-out phrasing matches a training request (tests/test_data.py).
  Gated with its own thresholds.

``tool_call_record`` writes an example in TRL's function-calling format instead (``data.format=tool_calls``):
the functions' JSON schemas in ``tools`` (``TOOLS``), the answer as a structured ``tool_calls`` entry (a
refusal as a spoken text answer, no call), and in a share of lines an earlier request of the same split
with its call, the tool's result and a spoken confirmation before it (multi-turn).

Names, places, artists and message texts are composed procedurally (hundreds to thousands of values
per pool) so that a model must learn to *copy* them from the request into the JSON rather than
memorise a short list. Pure Python; no torch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

GENERATOR_VERSION = "car_assistant/2"
SPLITS = ("train", "validation", "test", "heldout")
HELDOUT_PARTS = ("values", "phrasing", "both")  # the parts of the heldout split, in the order they cycle
OPEN_INTENTS = ("navigate_to", "play_music", "call_contact", "send_message")  # intents whose values are copied


@dataclass(frozen=True)
class Example:
    """One request and its reference tool call."""

    request: str
    call: dict  # {"tool": str, "args": {...}}
    lang: str  # "en" | "zh"
    intent: str
    split: str
    core: int  # index of the phrasing in the intent's core list (held-out phrasings: in HELDOUT_CORES)
    part: str = ""  # heldout only: values | phrasing | both
    cross_script: bool = False  # an open value in the other language's script

    @property
    def answer(self) -> str:
        return tool_call_json(self.call)

    def to_record(self) -> dict:
        rec = {
            "messages": [
                {"role": "user", "content": self.request},
                {"role": "assistant", "content": self.answer},
            ],
            "lang": self.lang,
            "intent": self.intent,
            "split": self.split,
            "core": self.core,
        }
        if self.part:
            rec["part"] = self.part
        return rec


def tool_call_json(call: dict) -> str:
    """The compact JSON the assistant answers with: ``{"tool":...,"args":{...}}``."""
    return json.dumps(call, ensure_ascii=False, separators=(",", ":"))


# --------------------------------------------------------------------------------------------
# Training value parts. Pools are their recombinations (first x last name, head x tail place, ...).
# --------------------------------------------------------------------------------------------

EN_FIRST = (
    "Alice Bob Carol David Emma Frank Grace Henry Irene Jack Karen Leo Maria Nathan Olivia Peter "
    "Quinn Rachel Sam Tina Victor Wendy Xavier Yvonne Zack Amy Brian Chloe Daniel Ella Fiona George "
    "Hannah Ian Julia Kevin Laura Mark Nina Oscar Paula Ryan Sarah Tom Uma Vera Will Zoe Adam Bella "
    "Chris Diana Eric Holly Isaac Jenny Kyle Lucy Mike Nora"
).split()
EN_LAST = (
    "Smith Johnson Brown Taylor Miller Wilson Moore Clark Lewis Walker Hall Allen Young King Wright "
    "Scott Green Baker Adams Nelson Hill Campbell Mitchell Roberts Carter Phillips Evans Turner Parker "
    "Collins Edwards Stewart Morris Murphy Cook Rogers Morgan Cooper Peterson Reed Bailey Bell Kelly "
    "Howard Ward Cox Rivera Wood Brooks Gray James Watson Hughes Price Sanders Myers Long Ross Foster"
).split()
ZH_SURNAME = list("王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘蒋蔡余杜叶程")
ZH_GIVEN = (
    "伟 芳 娜 敏 静 丽 强 磊 军 洋 勇 艳 杰 娟 涛 明 超 秀英 霞 平 刚 桂英 华 建华 建国 志强 "
    "晓明 小红 海燕 丹 玲 婷 宇 浩 欣 雪 琳 晨 阳 鹏 飞 凯 佳 文 斌 亮 慧 颖 博 瑞 子涵 梓萱 "
    "思远 嘉怡 一鸣 雨桐 天佑 若曦"
).split()

EN_PLACE_HEAD = (
    "Maple Oak Pine Cedar River Lake Hill Park Sunset Harbor Bay Spring Market Church Mill Station "
    "Bridge Forest Meadow Valley Garden Union Liberty Central Victoria Kingston Brighton Chester Oxford "
    "Windsor Hudson Lincoln Franklin Madison Jefferson Washington Elm Birch Willow Ash Stone Silver "
    "Golden Crystal Eagle Falcon Fox Bear Wolf Deer"
).split()
EN_PLACE_TAIL = (
    "Street|Road|Avenue|Mall|Park|Airport|Station|Hospital|Library|Stadium|Plaza|Square|Museum|"
    "Hotel|School|Market|Bridge|Center|Beach|Harbor"
).split("|")
ZH_PLACE_HEAD = (
    "北京 上海 广州 深圳 杭州 南京 成都 武汉 西安 重庆 天津 苏州 长沙 青岛 厦门 人民 中山 解放 "
    "和平 建设 新华 光明 东方 金桥 滨江 世纪 阳光 清华 江南 湖滨 南山 西湖 虹桥 浦东 朝阳 海淀 "
    "龙华 天河 高新 科技"
).split()
ZH_PLACE_TAIL = (
    "路 大街 公园 机场 火车站 医院 图书馆 体育馆 广场 博物馆 酒店 学校 市场 大桥 中心 商场 南站 北站 东站 西站".split()
)

EN_BAND_ADJ = (
    "Silver Golden Black White Electric Velvet Crimson Midnight Neon Wild Lonely Happy Broken Frozen "
    "Burning Quiet Rolling Flying Hidden Northern Southern Lucky Crazy Gentle Young Ancient Cosmic "
    "Blue Red Green Iron Paper Glass Honey Rusty Sleepy"
).split()
EN_BAND_NOUN = (
    "Foxes Tigers Rivers Dreams Stars Wolves Hearts Kings Queens Ghosts Birds Roses Lions Machines "
    "Echoes Shadows Waves Stones Rockets Pilots Sailors Giants Angels Monkeys Bandits Drifters "
    "Engines Lanterns Mountains Oceans Rebels Robots Tides Voices Wheels"
).split()
ZH_BAND_HEAD = (
    "五月 蓝色 青春 星空 夏日 北方 南方 红色 银色 梦想 自由 城市 海边 月光 晚风 远方 黎明 天空 白日 春天".split()
)
ZH_BAND_TAIL = "乐队 组合 少年 乐团 之声 合唱团 兄弟 姐妹".split()

EN_MSG = [
    "I will be there in {n} minutes",
    "running {n} minutes late",
    "meet me at {p}",
    "see you at {p}",
    "stuck in traffic near {p}",
    "on my way to {p}",
    "call me back in {n} minutes",
    "start without me I am {n} minutes away",
    "picking you up at {p}",
    "I have {n} bags with me",
]
ZH_MSG = [
    "我{n}分钟后到",
    "我要晚{n}分钟",
    "在{p}见",
    "我在{p}等你",
    "{p}附近堵车了",
    "我正在去{p}的路上",
    "{n}分钟后给我回电话",
    "你们先开始我还有{n}分钟",
    "我去{p}接你",
    "我带了{n}个包",
]

# --------------------------------------------------------------------------------------------
# Held-out value parts: candidates, of which ``build_pools`` keeps only those sharing no English word
# and no Chinese character with any training string (``training_vocabulary``).
# --------------------------------------------------------------------------------------------

HO_EN_FIRST = (
    "Aaron Bianca Caleb Delia Ethan Freya Gavin Hazel Ivan Jasmine Kieran Leila Miles Naomi Owen Priya "
    "Quentin Rosa Silas Tara Umar Violet Wesley Ximena Yusuf Zara Brent Celine Dmitri Elise Felix Gemma "
    "Hugo Ingrid Jonas Kenji Lena Marco Nadia Otto Pablo Rhea Soren Theo Ursula Vince Wanda Yara Zeke "
    "Anton Beatrix Cyrus Darius Esme Farah Gideon Harriet Ines Jude Kai Luca Mina Nico"
).split()
HO_EN_LAST = (
    "Nguyen Patel Garcia Kowalski Okafor Schmidt Rossi Larsen Dubois Novak Tanaka Silva Fischer Moreau "
    "Costa Jensen Horvath Romero Bianchi Lindqvist Mendez Kaur Petrov Haddad Suzuki Weber Castillo Ortega "
    "Fernandes Becker Ivanova Yilmaz Andersen Kumar Santos Hoffmann"
).split()
HO_ZH_SURNAME = "欧阳 司马 诸葛 上官 慕容 孔 严 柳 秦 魏 姜 范 姚 谭 廖 邹 熊 陆 郝 孟 毛 邱 尹 汪 段 钱 侯 史 陶 黎 贺 顾 武 乔 薛 纪 简 柯 贾 单".split()
HO_ZH_GIVEN = (
    "昊 俊熙 诗涵 梦琪 紫轩 依诺 可馨 沐辰 奕 泽楷 嫣 曜 婧 琦 蓓 骁 锐 璇 瑶 翊 骏 菁 茜 蕾 昕 睿 熠 彤 桦 靖 "
    "珂 琛 妍 娴 晗 笛 芮 萌 烨 霖 骞 沁 翎 珊 璐 歆 蔓 莹"
).split()
HO_EN_CITY = (
    "Seattle Denver Boston Austin Portland Phoenix Dallas Atlanta Toronto Dublin Vienna Lisbon Geneva Oslo "
    "Prague Sydney Auckland Cairo Nairobi Kyoto Osaka Seoul Mumbai Helsinki Zurich Montreal Memphis Tucson"
).split()
HO_EN_PLACE_TAIL = "Pier Terrace Boulevard Quay Crescent Arena Campus Gardens Lane Wharf Observatory Aquarium".split()
HO_ZH_CITY = (
    "拉萨 哈尔滨 昆明 贵阳 兰州 银川 呼和浩特 桂林 洛阳 敦煌 珠海 汕头 烟台 潍坊 绍兴 嘉兴 泉州 漳州 赣州 遵义 鄂尔多斯 "
    "齐齐哈尔 佳木斯 牡丹江 秦皇岛 葫芦岛 景德镇 攀枝花 乌鲁木齐 喀什 吐鲁番 伊犁 九寨沟 峨眉 婺源 凤凰 宜宾 泸州 钦州 三亚 "
    "莆田 宁德 舟山 湖州 衢州 台州 温州 芜湖 蚌埠 淮南 亳州 阜阳"
).split()
HO_ZH_PLACE_TAIL = (
    "码头 剧院 隧道 植物园 游乐园 会展馆 步行街 湿地 渡口 溜冰场 水族馆 港湾 灯塔 驿站 栈桥 缆车 古镇 寺 塔 庙 瀑布 峡谷 "
    "沙滩 草原 雪场 营地 牧场 枢纽 客运站 服务区 收费站"
).split()
HO_EN_BAND_ADJ = "Amber Scarlet Hollow Savage Mellow Radiant Restless Stray Distant Faded Jagged Lunar Solar Rapid Copper Marble Tender Fierce Humble".split()
HO_EN_BAND_NOUN = "Comets Ravens Pirates Wizards Hornets Jaguars Nomads Orchids Prophets Rangers Sparrows Thieves Vikings Mirrors Canyons Meteors".split()
HO_EN_ARTISTS = "Metallica Coldplay Adele Radiohead Nirvana Shakira Eminem Abba Oasis Blur Muse Rihanna Drake Sting Bjork Beyonce".split()
HO_ZH_BAND_HEAD = (
    "琥珀 猎户 极光 仲夏 暮色 萤火 潮汐 霓虹 冰川 候鸟 鲸鱼 蒲公英 薄荷 橘子 松鼠 刺猬 企鹅 狐狸 麋鹿 蜻蜓 蝴蝶 孔雀 沙漠 "
    "火焰 雷霆 闪电 彩虹 琉璃 翡翠 玛瑙"
).split()
HO_ZH_BAND_TAIL = "俱乐部 二重唱 剧团 工厂 计划 派对 剧社 公社 联盟 舞团".split()
HO_EN_MSG = [
    "I forgot my keys at {p}",
    "dinner is ready in {n} minutes",
    "the meeting moved to {p}",
    "bring an umbrella to {p}",
    "save me a seat at {p}",
    "do not wait up for me",
    "grab some milk on your way home",
    "the kids need a ride at {n}",
]
HO_ZH_MSG = [
    "钥匙忘在{p}了",
    "晚饭{n}分钟后好",
    "会议挪到{p}了",
    "记得带伞到{p}",
    "帮我在{p}占个座",
    "不用等我吃饭",
    "回家路上买点牛奶",
    "孩子们{n}点要人接",
]

# Held-out phrasings: no training request uses them (tests/test_data.py matches each against every training
# request). Same slots as the intent's training cores; the heldout split's ``phrasing`` and ``both`` parts.
HELDOUT_CORES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "set_temperature": (
        ("bump the {zone} temp to {deg}", "{deg} on the {zone} side"),
        ("{zone}那边温度给我弄成{deg}", "{zone}温度来个{deg}"),
    ),
    "set_fan_speed": (
        ("blow the fan at level {level}", "give me fan level {level}"),
        ("我要{level}档风", "风给我开{level}档"),
    ),
    "climate_control": (
        ("{feature} should be {state}", "get the {feature} {state} for me"),
        ("帮忙把{feature}给{state}", "{feature}给我{state}了"),
    ),
    "navigate_to": (("I need to get to {place}", "head over to {place}"), ("去{place}怎么走", "导我到{place}去")),
    "find_nearby": (
        ("any {poi} around here", "is there a {poi} close by"),
        ("帮我搜一下周边的{poi}", "周围有没有{poi}"),
    ),
    "play_music": (("shuffle {artist}", "queue up {artist}"), ("来首{artist}的", "给我放{artist}")),
    "set_volume": (("turn the sound to {level}", "audio level {level}"), ("声音调成{level}", "把声音弄到{level}")),
    "tune_radio": (("go to station {freq}", "listen to station {freq}"), ("切到{freq}兆赫", "听一下{freq}频道")),
    "call_contact": (("give {name} a call", "ring {name}"), ("给{name}拨个电话", "联系一下{name}")),
    "send_message": (
        ("let {name} know {text}", "drop {name} a note: {text}"),
        ("跟{name}说一声{text}", "帮我回复{name}{text}"),
    ),
    "open_window": (
        ("lower the {window} window to {pct} percent", "crack the {window} window {pct} percent"),
        ("{window}窗户降到{pct}%", "把{window}的窗摇到百分之{pct}"),
    ),
    "set_seat_heating": (
        ("warm up the {seat} seat to level {level}", "{seat} seat warmer at {level}"),
        ("给{seat}座椅热一下开{level}档", "{seat}的座椅加个热开{level}档"),
    ),
    "set_lights": (
        ("flip the {light} {state}", "get the {light} {state}"),
        ("帮我{state}一下{light}", "{light}给我{state}"),
    ),
    "get_vehicle_info": (("how is the {item}", "give me the {item} reading"), ("{item}还有多少", "看看{item}")),
    "refuse": (("would you {req}", "go ahead and {req}"), ("你能{req}吗", "麻烦你现在就{req}")),
}


def _stable_hash(*parts: object) -> int:
    return int(hashlib.md5("|".join(map(str, parts)).encode()).hexdigest()[:12], 16)


_EN_WORD = re.compile(r"[a-z]+")
_ZH_CHAR = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


def units(text: str) -> set[str]:
    """What "a part occurs" means for disjointness: the lower-cased English words and the Chinese characters of ``text``."""
    return set(_EN_WORD.findall(text.lower())) | set(_ZH_CHAR.findall(text))


@dataclass(frozen=True)
class Pools:
    """Open values of one language and one side (training or held out)."""

    names: tuple[str, ...]
    places: tuple[str, ...]
    artists: tuple[str, ...]
    messages: tuple[str, ...]  # message templates with {n} (a number) and {p} (a place)


def _training_strings() -> list[str]:
    """Every string a training request can be built from: value parts, message templates, phrasings,
    enumerated slot surfaces, refusals, politeness wrappers."""
    out = [*EN_FIRST, *EN_LAST, *ZH_SURNAME, *ZH_GIVEN, *EN_PLACE_HEAD, *EN_PLACE_TAIL, *ZH_PLACE_HEAD]
    out += [*ZH_PLACE_TAIL, *EN_BAND_ADJ, *EN_BAND_NOUN, *ZH_BAND_HEAD, *ZH_BAND_TAIL, *EN_MSG, *ZH_MSG]
    out += ["The", "degrees fahrenheit", "degrees", "度", *REFUSALS_EN, *REFUSALS_ZH]
    for i in INTENTS:
        out += [*i.en, *i.zh]
    for table in (ZONES, WINDOWS, SEATS, LIGHTS, CLIMATE_FEATURES, POI, INFO, ON_OFF):
        for en, zh, _ in table:
            out += [*en, *zh]
    for lang in ("en", "zh"):
        out += [*PREFIX[lang], *SUFFIX[lang]]
    return out


@functools.cache
def training_vocabulary() -> frozenset[str]:
    """The English words and Chinese characters of every training string (``units``)."""
    return frozenset(u for s in _training_strings() for u in units(s))


def _unseen(parts: list[str]) -> tuple[str, ...]:
    seen = training_vocabulary()
    return tuple(p for p in parts if not units(p) & seen)


@functools.cache
def build_pools() -> dict[tuple[str, str], Pools]:
    """(language, "train" | "heldout") -> its pools. Held-out parts that share a word or a character
    with a training string are dropped, so no held-out value has a part training shows."""
    en_names = [f"{a} {b}" for a in EN_FIRST for b in EN_LAST]
    zh_names = [a + b for a in ZH_SURNAME for b in ZH_GIVEN]
    train = {
        "en": Pools(
            tuple(en_names),
            tuple(f"{a} {b}" for a in EN_PLACE_HEAD for b in EN_PLACE_TAIL),
            tuple([f"The {a} {b}" for a in EN_BAND_ADJ for b in EN_BAND_NOUN] + en_names[::7]),
            tuple(EN_MSG),
        ),
        "zh": Pools(
            tuple(zh_names),
            tuple(a + b for a in ZH_PLACE_HEAD for b in ZH_PLACE_TAIL),
            tuple([a + b for a in ZH_BAND_HEAD for b in ZH_BAND_TAIL] + zh_names[::5]),
            tuple(ZH_MSG),
        ),
    }
    ho_en_names = [f"{a} {b}" for a in _unseen(HO_EN_FIRST) for b in _unseen(HO_EN_LAST)]
    ho_zh_names = [a + b for a in _unseen(HO_ZH_SURNAME) for b in _unseen(HO_ZH_GIVEN)]
    cities_en, cities_zh = _unseen(HO_EN_CITY), _unseen(HO_ZH_CITY)
    held = {
        "en": Pools(
            tuple(ho_en_names),
            cities_en + tuple(f"{a} {b}" for a in cities_en for b in _unseen(HO_EN_PLACE_TAIL)),
            tuple(
                [f"{a} {b}" for a in _unseen(HO_EN_BAND_ADJ) for b in _unseen(HO_EN_BAND_NOUN)]
                + list(_unseen(HO_EN_ARTISTS))
                + ho_en_names[::7]
            ),
            tuple(HO_EN_MSG),
        ),
        "zh": Pools(
            tuple(ho_zh_names),
            cities_zh + tuple(a + b for a in cities_zh for b in _unseen(HO_ZH_PLACE_TAIL)),
            tuple([a + b for a in _unseen(HO_ZH_BAND_HEAD) for b in _unseen(HO_ZH_BAND_TAIL)] + ho_zh_names[::5]),
            tuple(HO_ZH_MSG),
        ),
    }
    return {**{(k, "train"): v for k, v in train.items()}, **{(k, "heldout"): v for k, v in held.items()}}


@functools.cache
def heldout_vocabulary() -> frozenset[str]:
    """The words and characters of every held-out open value (``units``): a generator of random values
    for training (``distill.data.augment``) avoids them, so augmentation cannot leak the heldout split."""
    out: set[str] = set()
    for (_, side), p in build_pools().items():
        if side == "heldout":
            for v in (*p.names, *p.places, *p.artists):
                out |= units(v)
    return frozenset(out)


# --------------------------------------------------------------------------------------------
# Enumerated slots: (English surfaces, Chinese surfaces, canonical value).
# --------------------------------------------------------------------------------------------

ZONES = [
    (["driver", "driver's"], ["主驾", "驾驶位"], "driver"),
    (["passenger", "co-driver"], ["副驾", "副驾驶"], "passenger"),
    (["rear", "back seat"], ["后排", "后座"], "rear"),
    (["whole car", "all"], ["全车", "所有区域"], "all"),
]
WINDOWS = [
    (["driver", "driver's"], ["主驾", "左前"], "driver"),
    (["passenger", "front right"], ["副驾", "右前"], "passenger"),
    (["rear left", "back left"], ["左后", "后排左侧"], "rear_left"),
    (["rear right", "back right"], ["右后", "后排右侧"], "rear_right"),
    (["all", "every"], ["所有", "全部"], "all"),
]
SEATS = [
    (["driver", "driver's"], ["主驾", "驾驶"], "driver"),
    (["passenger", "co-driver"], ["副驾", "乘客"], "passenger"),
]
LIGHTS = [
    (["headlights", "main lights"], ["大灯", "前大灯"], "headlights"),
    (["fog lights", "fog lamps"], ["雾灯", "前雾灯"], "fog_lights"),
    (["ambient light", "mood lighting"], ["氛围灯", "环境灯"], "ambient"),
    (["interior light", "cabin light"], ["车内灯", "阅读灯"], "interior"),
]
CLIMATE_FEATURES = [
    (["air conditioning", "AC"], ["空调", "冷气"], "ac"),
    (["defrost", "defroster"], ["除雾", "除霜"], "defrost"),
    (["recirculation", "air recirculation"], ["内循环", "空气内循环"], "recirculation"),
    (["seat ventilation", "seat cooling"], ["座椅通风", "座椅降温"], "seat_ventilation"),
]
POI = [
    (["gas station", "petrol station"], ["加油站", "油站"], "gas_station"),
    (["charging station", "charger"], ["充电站", "充电桩"], "charging_station"),
    (["parking", "car park"], ["停车场", "停车位"], "parking"),
    (["restaurant", "place to eat"], ["餐厅", "饭店"], "restaurant"),
    (["coffee shop", "cafe"], ["咖啡店", "咖啡馆"], "coffee"),
    (["toilet", "restroom"], ["洗手间", "厕所"], "restroom"),
]
INFO = [
    (["range", "remaining range"], ["续航", "剩余续航"], "range"),
    (["tyre pressure", "tire pressure"], ["胎压", "轮胎气压"], "tyre_pressure"),
    (["fuel level", "fuel"], ["油量", "剩余油量"], "fuel_level"),
    (["battery level", "battery charge"], ["电量", "电池电量"], "battery_level"),
    (["oil life", "engine oil"], ["机油寿命", "机油"], "oil_life"),
]
ON_OFF = [(["on", "on"], ["打开", "开启"], "on"), (["off", "off"], ["关闭", "关掉"], "off")]

REFUSALS_EN = [
    "order me a pizza",
    "book a flight to Paris",
    "what is the stock price of Tesla",
    "fly the car",
    "write my homework",
    "transfer money to my bank account",
    "make the car invisible",
    "change the engine oil for me",
    "cook dinner",
    "wash the car",
    "drive to the moon",
    "buy a lottery ticket",
    "fix the flat tyre",
    "print this document",
    "feed my dog",
    "make the car go 300 miles an hour",
    "teach me to swim",
    "turn the car into a boat",
]
REFUSALS_ZH = [
    "帮我点个外卖",
    "订一张去巴黎的机票",
    "特斯拉股价是多少",
    "让车飞起来",
    "帮我写作业",
    "给我银行账户转账",
    "让车隐形",
    "帮我换机油",
    "帮我做晚饭",
    "帮我洗车",
    "开到月球上去",
    "帮我买彩票",
    "帮我修爆胎",
    "打印这个文件",
    "帮我喂狗",
    "把车速开到三百公里",
    "教我游泳",
    "把车变成船",
]

# Politeness wrappers: they multiply phrasings without new content words.
PREFIX = {
    "en": ["", "please ", "can you ", "could you please ", "hey car, ", "I want you to ", "ok car, "],
    "zh": ["", "请", "帮我", "麻烦", "你好，", "我想要你", "小车小车，"],
}
SUFFIX = {"en": ["", " please", " now", " thanks", " right now"], "zh": ["", "吧", "一下", "，谢谢", "，现在"]}


# --------------------------------------------------------------------------------------------
# Intents. Each has per-language training "cores" (phrasings with {slots}); HELDOUT_CORES holds the
# phrasings only the heldout split uses. A slot sampler returns (surface per slot, canonical args).
# --------------------------------------------------------------------------------------------

Sampler = Callable[[random.Random, str, Pools], tuple[dict, dict]]


def _enum(rng: random.Random, table: list, lang: str) -> tuple[str, str]:
    en, zh, canon = rng.choice(table)
    return rng.choice(en if lang == "en" else zh), canon


def _temp(rng, lang, pools):
    zone_s, zone = _enum(rng, ZONES, lang)
    if lang == "en" and rng.random() < 0.3:
        value, unit = rng.randint(60, 85), "fahrenheit"
        deg = f"{value} degrees fahrenheit"
    else:
        value, unit = rng.randint(16, 30), "celsius"
        deg = f"{value} degrees" if lang == "en" else f"{value}度"
    return {"zone": zone_s, "deg": deg}, {"zone": zone, "value": value, "unit": unit}


def _fan(rng, lang, pools):
    level = rng.randint(1, 7)
    return {"level": str(level)}, {"level": level}


def _climate_toggle(rng, lang, pools):
    feat_s, feat = _enum(rng, CLIMATE_FEATURES, lang)
    st_s, st = _enum(rng, ON_OFF, lang)
    return {"feature": feat_s, "state": st_s}, {"feature": feat, "state": st}


def _navigate(rng, lang, pools):
    place = rng.choice(pools.places)
    return {"place": place}, {"destination": place}


def _nearby(rng, lang, pools):
    poi_s, poi = _enum(rng, POI, lang)
    return {"poi": poi_s}, {"category": poi}


def _play(rng, lang, pools):
    artist = rng.choice(pools.artists)
    return {"artist": artist}, {"artist": artist}


def _volume(rng, lang, pools):
    level = rng.randint(0, 30)
    return {"level": str(level)}, {"level": level}


def _radio(rng, lang, pools):
    freq = round(rng.randint(875, 1080) / 10, 1)
    return {"freq": f"{freq:.1f}"}, {"frequency": freq}


def _call(rng, lang, pools):
    name = rng.choice(pools.names)
    return {"name": name}, {"name": name}


def _message(rng, lang, pools):
    name = rng.choice(pools.names)
    text = rng.choice(pools.messages).format(n=rng.randint(2, 59), p=rng.choice(pools.places))
    return {"name": name, "text": text}, {"name": name, "text": text}


def _window(rng, lang, pools):
    win_s, win = _enum(rng, WINDOWS, lang)
    pct = rng.choice([0, 10, 20, 25, 30, 40, 50, 60, 70, 75, 80, 90, 100])
    return {"window": win_s, "pct": str(pct)}, {"position": win, "percent": pct}


def _seat_heat(rng, lang, pools):
    seat_s, seat = _enum(rng, SEATS, lang)
    level = rng.randint(0, 3)
    return {"seat": seat_s, "level": str(level)}, {"seat": seat, "level": level}


def _lights(rng, lang, pools):
    light_s, light = _enum(rng, LIGHTS, lang)
    st_s, st = _enum(rng, ON_OFF, lang)
    return {"light": light_s, "state": st_s}, {"light": light, "state": st}


def _info(rng, lang, pools):
    item_s, item = _enum(rng, INFO, lang)
    return {"item": item_s}, {"item": item}


def _refuse(rng, lang, pools):
    return {"req": rng.choice(REFUSALS_EN if lang == "en" else REFUSALS_ZH)}, {"reason": "unsupported"}


@dataclass(frozen=True)
class Intent:
    name: str  # tool name
    sampler: Sampler
    en: tuple[str, ...]
    zh: tuple[str, ...]
    primary: str | None  # canonical arg whose pairing with the phrasing the test split reserves


INTENTS: tuple[Intent, ...] = (
    Intent(
        "set_temperature",
        _temp,
        (
            "set the {zone} temperature to {deg}",
            "make it {deg} for the {zone}",
            "{zone} temperature {deg}",
            "change the {zone} climate to {deg}",
            "I want the {zone} temperature at {deg}",
        ),
        (
            "把{zone}温度调到{deg}",
            "{zone}温度设为{deg}",
            "{zone}调到{deg}",
            "将{zone}空调温度改成{deg}",
            "我想要{zone}是{deg}",
        ),
        "value",
    ),
    Intent(
        "set_fan_speed",
        _fan,
        (
            "set the fan speed to {level}",
            "fan to level {level}",
            "change the fan to {level}",
            "make the fan level {level}",
        ),
        ("把风量调到{level}档", "风速设为{level}档", "风量改成{level}档", "我想要风量{level}档"),
        "level",
    ),
    Intent(
        "climate_control",
        _climate_toggle,
        (
            "turn {state} the {feature}",
            "switch the {feature} {state}",
            "{feature} {state}",
            "I want the {feature} {state}",
        ),
        ("{state}{feature}", "把{feature}{state}", "{feature}{state}", "我想要{state}{feature}"),
        "feature",
    ),
    Intent(
        "navigate_to",
        _navigate,
        (
            "navigate to {place}",
            "take me to {place}",
            "drive to {place}",
            "set the destination to {place}",
            "I want to go to {place}",
        ),
        ("导航到{place}", "带我去{place}", "开车去{place}", "把目的地设为{place}", "我想要去{place}"),
        "destination",
    ),
    Intent(
        "find_nearby",
        _nearby,
        (
            "find a {poi} nearby",
            "where is the nearest {poi}",
            "search for a {poi} near me",
            "I want to find the nearest {poi}",
        ),
        ("找一下附近的{poi}", "最近的{poi}在哪里", "搜索附近的{poi}", "我想要找最近的{poi}"),
        "category",
    ),
    Intent(
        "play_music",
        _play,
        (
            "play some {artist}",
            "play music by {artist}",
            "put on {artist}",
            "I want to hear {artist}",
            "I want to hear music by {artist}",
        ),
        ("播放{artist}的歌", "来点{artist}的音乐", "放一首{artist}的歌", "我想听{artist}", "我想要放{artist}的歌"),
        "artist",
    ),
    Intent(
        "set_volume",
        _volume,
        ("set the volume to {level}", "volume {level}", "change the volume to {level}", "make the volume {level}"),
        ("把音量调到{level}", "音量设为{level}", "音量改成{level}", "我想要音量{level}"),
        "level",
    ),
    Intent(
        "tune_radio",
        _radio,
        ("tune the radio to {freq}", "play radio {freq}", "switch to {freq} FM", "I want to hear radio {freq}"),
        ("收音机调到{freq}", "播放电台{freq}", "切换到调频{freq}", "我想听电台{freq}"),
        "frequency",
    ),
    Intent(
        "call_contact",
        _call,
        ("call {name}", "phone {name}", "dial {name}", "make a call to {name}", "I want to call {name}"),
        ("打电话给{name}", "给{name}打电话", "呼叫{name}", "拨打{name}的电话", "我想要给{name}打个电话"),
        "name",
    ),
    Intent(
        "send_message",
        _message,
        (
            "send a message to {name} saying {text}",
            "text {name} {text}",
            "message {name}: {text}",
            "tell {name} that {text}",
            "I want to send {name} a message saying {text}",
        ),
        (
            "给{name}发消息说{text}",
            "发短信给{name}：{text}",
            "告诉{name}{text}",
            "给{name}发信息{text}",
            "我想要给{name}发个消息说{text}",
        ),
        "name",
    ),
    Intent(
        "open_window",
        _window,
        (
            "open the {window} window to {pct} percent",
            "set the {window} window to {pct} percent",
            "{window} window {pct} percent",
            "I want the {window} window at {pct} percent",
        ),
        (
            "把{window}车窗打开到百分之{pct}",
            "{window}车窗开到{pct}%",
            "{window}窗户调到百分之{pct}",
            "我想要{window}车窗开{pct}%",
        ),
        "percent",
    ),
    Intent(
        "set_seat_heating",
        _seat_heat,
        (
            "set the {seat} seat heating to level {level}",
            "{seat} seat heater {level}",
            "turn the {seat} seat heating to {level}",
            "I want the {seat} seat heating at level {level}",
        ),
        (
            "把{seat}座椅加热调到{level}档",
            "{seat}座椅加热{level}档",
            "{seat}座椅加热设为{level}档",
            "我想要{seat}座椅加热{level}档",
        ),
        "level",
    ),
    Intent(
        "set_lights",
        _lights,
        ("turn {state} the {light}", "switch the {light} {state}", "{light} {state}", "I want the {light} {state}"),
        ("{state}{light}", "把{light}{state}", "{light}{state}", "我想要{state}{light}"),
        "light",
    ),
    Intent(
        "get_vehicle_info",
        _info,
        (
            "what is the {item}",
            "check the {item}",
            "tell me the {item}",
            "show me the {item}",
            "I want to check the {item}",
        ),
        ("{item}是多少", "查一下{item}", "告诉我{item}", "显示{item}", "我想要查{item}"),
        "item",
    ),
    Intent(
        "refuse",
        _refuse,
        ("{req}", "{req} for me", "I want you to {req}"),
        ("{req}", "现在{req}", "我想要你{req}"),
        None,
    ),
)
INTENT_BY_NAME = {i.name: i for i in INTENTS}
INTENT_BY_NAME = {i.name: i for i in INTENTS}


@dataclass(frozen=True)
class GeneratorSettings:
    """Everything the data depends on; its hash versions the data."""

    seed: int = 0
    num_train: int = 20000
    num_validation: int = 400
    num_test: int = 600
    num_heldout: int = 600
    reserve_modulus: int = 7  # 1 in N (phrasing, primary value) pairs is reserved for test/validation
    cross_script: float = 0.25  # share of heldout values / both requests whose open values are in the other script

    def data_hash(self) -> str:
        blob = json.dumps({"version": GENERATOR_VERSION, **self.__dict__}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _reserved(intent: str, lang: str, core: int, key: object, modulus: int) -> bool:
    return _stable_hash("pair", intent, lang, core, key) % modulus == 0


def _wrap(rng: random.Random, lang: str, core: str) -> str:
    request = rng.choice(PREFIX[lang]) + core + rng.choice(SUFFIX[lang])
    return request[0].upper() + request[1:] if lang == "en" else request


def _one(rng: random.Random, split: str, s: GeneratorSettings) -> Example | None:
    """A train / validation / test example: a training phrasing and training values; test and validation
    hold exactly the reserved (phrasing, primary value) pairs, train none of them."""
    intent = rng.choice(INTENTS)
    lang = rng.choice(("en", "zh"))
    cores = intent.en if lang == "en" else intent.zh
    core_idx = rng.randrange(len(cores))
    surf, args = intent.sampler(rng, lang, build_pools()[lang, "train"])
    key = args[intent.primary] if intent.primary else surf.get("req")
    if _reserved(intent.name, lang, core_idx, key, s.reserve_modulus) != (split != "train"):
        return None
    request = _wrap(rng, lang, cores[core_idx].format(**surf))
    return Example(request, {"tool": intent.name, "args": args}, lang, intent.name, split, core_idx)


def _heldout_one(rng: random.Random, part: str, s: GeneratorSettings) -> Example:
    """A heldout example of ``part``: held-out values (``values``), phrasings (``phrasing``) or both."""
    new_values = part in ("values", "both")
    intent = INTENT_BY_NAME[rng.choice(OPEN_INTENTS)] if new_values else rng.choice(INTENTS)
    lang = rng.choice(("en", "zh"))
    pools = build_pools()
    values = pools[lang, "heldout" if new_values else "train"]
    cross = new_values and rng.random() < s.cross_script
    if cross:  # names, places and artists of the other script; the message template stays in the request's
        values = replace(pools["zh" if lang == "en" else "en", "heldout"], messages=values.messages)
    surf, args = intent.sampler(rng, lang, values)
    if part == "values":
        cores = intent.en if lang == "en" else intent.zh
    else:
        cores = HELDOUT_CORES[intent.name][0 if lang == "en" else 1]
    core_idx = rng.randrange(len(cores))
    request = _wrap(rng, lang, cores[core_idx].format(**surf))
    return Example(request, {"tool": intent.name, "args": args}, lang, intent.name, "heldout", core_idx, part, cross)


def generate(split: str, settings: GeneratorSettings = GeneratorSettings()) -> list[Example]:
    """All examples of one split, deterministically from ``settings``.

    ``test`` never repeats a (phrasing, primary value) pair from ``train``; ``validation`` is drawn
    like ``test`` with another seed and never repeats a test request; ``heldout`` cycles through its
    parts (``HELDOUT_PARTS``) with held-out values and / or phrasings only.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    s = settings
    n = {"train": s.num_train, "validation": s.num_validation, "test": s.num_test, "heldout": s.num_heldout}[split]
    rng = random.Random(_stable_hash(settings.seed, split))
    exclude = {e.request for e in generate("test", settings)} if split == "validation" else set()
    out: list[Example] = []
    seen: set[str] = set()
    while len(out) < n:
        if split == "heldout":
            ex = _heldout_one(rng, HELDOUT_PARTS[len(out) % len(HELDOUT_PARTS)], s)
        else:
            ex = _one(rng, split, s)
        if ex is None or ex.request in exclude:
            continue
        if split != "train" and ex.request in seen:
            continue
        seen.add(ex.request)
        out.append(ex)
    return out


# --------------------------------------------------------------------------------------------
# The same examples in TRL's function-calling format (data.format=tool_calls)
# --------------------------------------------------------------------------------------------


def _codes(table: list) -> list[str]:
    return [canon for _, _, canon in table]


def _fn(name: str, description: str, props: dict, required: list[str] | None = None) -> dict:
    params = {"type": "object", "properties": props, "required": required if required is not None else list(props)}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": params}}


_STATE = {"type": "string", "enum": _codes(ON_OFF)}
# The functions' JSON schemas: argument names, types and enums as the generator's calls use them.
TOOLS: dict[str, dict] = {
    t["function"]["name"]: t
    for t in (
        _fn(
            "set_temperature",
            "Set the cabin temperature",
            {
                "zone": {"type": "string", "enum": _codes(ZONES)},
                "value": {"type": "integer"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
        ),
        _fn("set_fan_speed", "Set the fan speed", {"level": {"type": "integer"}}),
        _fn(
            "climate_control",
            "Switch a climate feature",
            {"feature": {"type": "string", "enum": _codes(CLIMATE_FEATURES)}, "state": _STATE},
        ),
        _fn("navigate_to", "Start navigation", {"destination": {"type": "string"}}),
        _fn("find_nearby", "Find a place nearby", {"category": {"type": "string", "enum": _codes(POI)}}),
        _fn("play_music", "Play an artist", {"artist": {"type": "string"}}),
        _fn("set_volume", "Set the volume", {"level": {"type": "integer"}}),
        _fn("tune_radio", "Tune the FM radio", {"frequency": {"type": "number"}}),
        _fn("call_contact", "Phone a contact", {"name": {"type": "string"}}),
        _fn("send_message", "Text a contact", {"name": {"type": "string"}, "text": {"type": "string"}}),
        _fn(
            "open_window",
            "Open a window",
            {"position": {"type": "string", "enum": _codes(WINDOWS)}, "percent": {"type": "integer"}},
        ),
        _fn(
            "set_seat_heating",
            "Set seat heating",
            {"seat": {"type": "string", "enum": _codes(SEATS)}, "level": {"type": "integer"}},
        ),
        _fn("set_lights", "Switch lights", {"light": {"type": "string", "enum": _codes(LIGHTS)}, "state": _STATE}),
        _fn("get_vehicle_info", "Read a vehicle status", {"item": {"type": "string", "enum": _codes(INFO)}}),
    )
}
TOOL_FORMAT_VERSION = "tool_calls/1"  # in the data hash of data.format=tool_calls: bump when these lines change
REFUSAL_TEXT = {"en": "Sorry, I can't do that in the car.", "zh": "抱歉，车上做不到这个。"}
CONFIRM_TEXT = {"en": "Done.", "zh": "好的，已完成。"}
TOOL_RESULT = '{"status": "ok"}'


def _answer(e: Example) -> dict:
    if e.call["tool"] not in TOOLS:  # refuse: no function does it, so the assistant says so
        return {"role": "assistant", "content": REFUSAL_TEXT[e.lang]}
    call = {"name": e.call["tool"], "arguments": e.call["args"]}
    return {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]}


def tool_call_records(examples: list[Example], *, tools_per_example: int = 4, multi_turn: float = 0.33) -> list[dict]:
    """``examples`` (one split) as TRL function-calling lines (``tool_call_record``)."""
    earlier: dict[str, list[Example]] = {}
    for x in examples:
        if x.call["tool"] in TOOLS:
            earlier.setdefault(x.lang, []).append(x)
    return [
        tool_call_record(e, i, earlier.get(e.lang, []), tools_per_example=tools_per_example, multi_turn=multi_turn)
        for i, e in enumerate(examples)
    ]


def tool_call_record(
    e: Example, i: int, earlier: list[Example], *, tools_per_example: int = 4, multi_turn: float = 0.33
) -> dict:
    """Example ``e`` (number ``i`` of its split) as a TRL function-calling line: ``tools`` holds the
    function it calls and others up to ``tools_per_example`` (0: all), shuffled; with probability
    ``multi_turn`` a call drawn from ``earlier`` (same split and language) comes first: its request, its
    call, the tool's result, a spoken confirmation. Deterministic in the example and its index."""
    rng = random.Random(_stable_hash("tool_calls", e.split, i, e.request))
    msgs: list[dict] = []
    used = {e.call["tool"]} & set(TOOLS)
    if rng.random() < multi_turn and earlier:
        prev = earlier[rng.randrange(len(earlier))]
        if prev.request != e.request:
            used.add(prev.call["tool"])
            msgs += [
                {"role": "user", "content": prev.request},
                _answer(prev),
                {"role": "tool", "name": prev.call["tool"], "content": TOOL_RESULT},
                {"role": "assistant", "content": CONFIRM_TEXT[e.lang]},
            ]
    msgs += [{"role": "user", "content": e.request}, _answer(e)]
    others = sorted(set(TOOLS) - used)
    k = len(TOOLS) if tools_per_example == 0 else max(tools_per_example, len(used))
    names = sorted(used) + rng.sample(others, min(max(k - len(used), 0), len(others)))
    rng.shuffle(names)
    rec = {"messages": msgs, "tools": [TOOLS[n] for n in names], "lang": e.lang, "intent": e.intent, "split": e.split}
    if e.part:
        rec["part"] = e.part
    return rec
