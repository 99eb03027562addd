"""Bilingual (English / Chinese) in-car command data: request -> one tool call as compact JSON.

Deterministic and seeded. Four splits, built so that each one measures something different:

- ``train`` / ``validation``: training phrasings ("cores") with slot values from the training pools.
- ``test``: training phrasings and training values, but every (phrasing, primary value) pair is one
  that training never shows together (a hash of the pair reserves it). Gated by the release gate.
- ``hard``: phrasings held out of training entirely (built from words training uses) and slot values
  from held-out pools (recombinations of name / place / artist parts that training never shows).
  Reported beside ``test``, never gated: it separates good compression from poor.

Names, places, artists and message texts are composed procedurally (hundreds to thousands of values
per pool) so that a model must learn to *copy* them from the request into the JSON rather than
memorise a short list. Pure Python; no torch.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field

GENERATOR_VERSION = "car_assistant/1"
SPLITS = ("train", "validation", "test", "hard")


@dataclass(frozen=True)
class Example:
    """One request and its reference tool call."""

    request: str
    call: dict  # {"tool": str, "args": {...}}
    lang: str  # "en" | "zh"
    intent: str
    split: str
    core: int  # index of the phrasing in the intent's core list (the last one is hard-only)

    @property
    def answer(self) -> str:
        return tool_call_json(self.call)

    def to_record(self) -> dict:
        return {
            "messages": [
                {"role": "user", "content": self.request},
                {"role": "assistant", "content": self.answer},
            ],
            "lang": self.lang,
            "intent": self.intent,
            "split": self.split,
            "core": self.core,
        }


def tool_call_json(call: dict) -> str:
    """The compact JSON the assistant answers with: ``{"tool":...,"args":{...}}``."""
    return json.dumps(call, ensure_ascii=False, separators=(",", ":"))


# --------------------------------------------------------------------------------------------
# Value pools. Each pool is a list of (surface text, canonical value). Composed pools are split
# into a training part and a held-out ("hard") part by a stable hash of the value.
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


def _stable_hash(*parts: object) -> int:
    return int(hashlib.md5("|".join(map(str, parts)).encode()).hexdigest()[:12], 16)


def _is_held_out(value: str, fraction: float) -> bool:
    return (_stable_hash("value", value) % 1000) < fraction * 1000


@dataclass
class Pools:
    """Composed value pools for one language, split into train and held-out parts."""

    names: dict[str, list[str]] = field(default_factory=dict)
    places: dict[str, list[str]] = field(default_factory=dict)
    artists: dict[str, list[str]] = field(default_factory=dict)


def _split_pool(values: list[str], fraction: float) -> dict[str, list[str]]:
    held = [v for v in values if _is_held_out(v, fraction)]
    kept = [v for v in values if not _is_held_out(v, fraction)]
    return {"train": kept, "hard": held}


def build_pools(held_out_fraction: float) -> dict[str, Pools]:
    en_names = [f"{a} {b}" for a in EN_FIRST for b in EN_LAST]
    zh_names = [a + b for a in ZH_SURNAME for b in ZH_GIVEN]
    en_places = [f"{a} {b}" for a in EN_PLACE_HEAD for b in EN_PLACE_TAIL]
    zh_places = [a + b for a in ZH_PLACE_HEAD for b in ZH_PLACE_TAIL]
    en_artists = [f"The {a} {b}" for a in EN_BAND_ADJ for b in EN_BAND_NOUN] + en_names[::7]
    zh_artists = [a + b for a in ZH_BAND_HEAD for b in ZH_BAND_TAIL] + zh_names[::5]
    f = held_out_fraction
    return {
        "en": Pools(_split_pool(en_names, f), _split_pool(en_places, f), _split_pool(en_artists, f)),
        "zh": Pools(_split_pool(zh_names, f), _split_pool(zh_places, f), _split_pool(zh_artists, f)),
    }


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
# Intents. Each has per-language "cores" (phrasings with {slots}); the LAST core of each list is the
# held-out phrasing used only by the hard split, written from words the other cores use.
# A slot sampler returns (surface per slot, canonical args).
# --------------------------------------------------------------------------------------------

Sampler = Callable[[random.Random, str, Pools, str], tuple[dict, dict]]


def _enum(rng: random.Random, table: list, lang: str) -> tuple[str, str]:
    en, zh, canon = rng.choice(table)
    return rng.choice(en if lang == "en" else zh), canon


def _pick(rng: random.Random, pool: dict[str, list[str]], part: str) -> str:
    return rng.choice(pool[part])


def _temp(rng, lang, pools, part):
    zone_s, zone = _enum(rng, ZONES, lang)
    if lang == "en" and rng.random() < 0.3:
        value, unit = rng.randint(60, 85), "fahrenheit"
        deg = f"{value} degrees fahrenheit"
    else:
        value, unit = rng.randint(16, 30), "celsius"
        deg = f"{value} degrees" if lang == "en" else f"{value}度"
    return {"zone": zone_s, "deg": deg}, {"zone": zone, "value": value, "unit": unit}


def _fan(rng, lang, pools, part):
    level = rng.randint(1, 7)
    return {"level": str(level)}, {"level": level}


def _climate_toggle(rng, lang, pools, part):
    feat_s, feat = _enum(rng, CLIMATE_FEATURES, lang)
    st_s, st = _enum(rng, ON_OFF, lang)
    return {"feature": feat_s, "state": st_s}, {"feature": feat, "state": st}


def _navigate(rng, lang, pools, part):
    place = _pick(rng, pools.places, part)
    return {"place": place}, {"destination": place}


def _nearby(rng, lang, pools, part):
    poi_s, poi = _enum(rng, POI, lang)
    return {"poi": poi_s}, {"category": poi}


def _play(rng, lang, pools, part):
    artist = _pick(rng, pools.artists, part)
    return {"artist": artist}, {"artist": artist}


def _volume(rng, lang, pools, part):
    level = rng.randint(0, 30)
    return {"level": str(level)}, {"level": level}


def _radio(rng, lang, pools, part):
    freq = round(rng.randint(875, 1080) / 10, 1)
    return {"freq": f"{freq:.1f}"}, {"frequency": freq}


def _call(rng, lang, pools, part):
    name = _pick(rng, pools.names, part)
    return {"name": name}, {"name": name}


def _message(rng, lang, pools, part):
    name = _pick(rng, pools.names, part)
    tmpl = rng.choice(EN_MSG if lang == "en" else ZH_MSG)
    text = tmpl.format(n=rng.randint(2, 59), p=_pick(rng, pools.places, part))
    return {"name": name, "text": text}, {"name": name, "text": text}


def _window(rng, lang, pools, part):
    win_s, win = _enum(rng, WINDOWS, lang)
    pct = rng.choice([0, 10, 20, 25, 30, 40, 50, 60, 70, 75, 80, 90, 100])
    return {"window": win_s, "pct": str(pct)}, {"position": win, "percent": pct}


def _seat_heat(rng, lang, pools, part):
    seat_s, seat = _enum(rng, SEATS, lang)
    level = rng.randint(0, 3)
    return {"seat": seat_s, "level": str(level)}, {"seat": seat, "level": level}


def _lights(rng, lang, pools, part):
    light_s, light = _enum(rng, LIGHTS, lang)
    st_s, st = _enum(rng, ON_OFF, lang)
    return {"light": light_s, "state": st_s}, {"light": light, "state": st}


def _info(rng, lang, pools, part):
    item_s, item = _enum(rng, INFO, lang)
    return {"item": item_s}, {"item": item}


def _refuse(rng, lang, pools, part):
    table = REFUSALS_EN if lang == "en" else REFUSALS_ZH
    # The last quarter of the unsupported requests is held out for the hard split.
    cut = len(table) * 3 // 4
    req = rng.choice(table[cut:] if part == "hard" else table[:cut])
    return {"req": req}, {"reason": "unsupported"}


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


@dataclass(frozen=True)
class GeneratorSettings:
    """Everything the data depends on; its hash versions the data."""

    seed: int = 0
    num_train: int = 20000
    num_validation: int = 400
    num_test: int = 600
    num_hard: int = 600
    held_out_fraction: float = 0.2  # share of each composed value pool kept for the hard split
    reserve_modulus: int = 7  # 1 in N (phrasing, primary value) pairs is reserved for test/validation

    def data_hash(self) -> str:
        blob = json.dumps({"version": GENERATOR_VERSION, **self.__dict__}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _reserved(intent: str, lang: str, core: int, key: object, modulus: int) -> bool:
    return _stable_hash("pair", intent, lang, core, key) % modulus == 0


def _one(rng: random.Random, split: str, pools: dict[str, Pools], s: GeneratorSettings) -> Example | None:
    intent = rng.choice(INTENTS)
    lang = rng.choice(("en", "zh"))
    cores = intent.en if lang == "en" else intent.zh
    part = "hard" if split == "hard" else "train"
    core_idx = len(cores) - 1 if split == "hard" else rng.randrange(len(cores) - 1)
    surf, args = intent.sampler(rng, lang, pools[lang], part)
    key = args[intent.primary] if intent.primary else surf.get("req")
    if split in ("test", "validation", "train"):
        reserved = _reserved(intent.name, lang, core_idx, key, s.reserve_modulus)
        if reserved != (split != "train"):
            return None
    core = cores[core_idx].format(**surf)
    request = rng.choice(PREFIX[lang]) + core + rng.choice(SUFFIX[lang])
    if lang == "en":
        request = request[0].upper() + request[1:]
    return Example(request, {"tool": intent.name, "args": args}, lang, intent.name, split, core_idx)


def generate(split: str, settings: GeneratorSettings = GeneratorSettings()) -> list[Example]:
    """All examples of one split, deterministically from ``settings``.

    ``test`` never repeats a (phrasing, primary value) pair from ``train``; ``validation`` is drawn
    like ``test`` with another seed and never repeats a test request; ``hard`` uses held-out phrasings
    and held-out values only.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    s = settings
    n = {"train": s.num_train, "validation": s.num_validation, "test": s.num_test, "hard": s.num_hard}[split]
    pools = build_pools(settings.held_out_fraction)
    rng = random.Random(_stable_hash(settings.seed, split))
    exclude = {e.request for e in generate("test", settings)} if split == "validation" else set()
    out: list[Example] = []
    seen: set[str] = set()
    while len(out) < n:
        ex = _one(rng, split, pools, settings)
        if ex is None or ex.request in exclude:
            continue
        if split != "train" and ex.request in seen:
            continue
        seen.add(ex.request)
        out.append(ex)
    return out
