"""The demo model's training corpus: seeded synthetic conversations rendered by our own V3.2 encoder.

Four families, each in thinking and chat mode:

* ``arithmetic``: sums, differences and small products, bare or as short word problems; in thinking mode the
  reasoning works column by column (``ones: 8 + 5 = 13, write 3, carry 1; tens: ...``) and the answer states the
  result.
* ``tools``: a handful of tools (``get_weather``, ``calculator``, ``convert_units``, ``search`` over a small built-in
  table) offered as OpenAI ``tools``; the assistant calls them in DSML (one or several calls in one turn), gets the
  results and answers with them. Also questions that need no tool, and ``tool_choice: "none"`` (no tools rendered,
  the answer is text).
* ``json``: answers that follow a JSON schema given as ``response_format`` (key names vary, so the schema must be read).
* ``chat``: greetings and facts from a small table.

Every conversation is an OpenAI chat request plus the replies that follow it. ``render`` turns it into text exactly
as the server would prompt it (``prepare_chat_request``) followed by the replies, and marks which spans the model
writes (the trained spans): each assistant message up to and including its end-of-sentence token.

Held out for evaluation: every pair of two-digit operands with ``held_out_pair``, and the cities of
``HELD_OUT_CITIES``; ``examples(..., split="heldout")`` draws only from those, ``split="train"`` never does. City
names are mostly made up from syllables so the model learns to copy a name from the prompt rather than recall it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from dsv32.encoding.encode import encode_messages
from dsv32.encoding.requests import prepare_chat_request

SPLITS = ("train", "heldout")
TASKS = ("arithmetic", "tools", "json", "chat")
TASK_WEIGHTS = (0.5, 0.3, 0.1, 0.1)  # arithmetic is short: half the conversations is ~15% of the tokens

# The tools of the acceptance check, byte for byte (descriptions and schemas), and two more.
GET_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
CONVERT_UNITS = {"type": "function", "function": {
    "name": "convert_units", "description": "Convert a value from one unit to another",
    "parameters": {"type": "object", "properties": {"value": {"type": "number"}, "from_unit": {"type": "string"},
                                                    "to_unit": {"type": "string"}},
                   "required": ["value", "from_unit", "to_unit"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search a small encyclopedia for a topic",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}
ALL_TOOLS = (GET_WEATHER, CALCULATOR, CONVERT_UNITS, SEARCH)

CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "foggy", "snowy", "clear", "stormy")
CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Egypt": "Cairo",
    "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo", "Greece": "Athens", "India": "New Delhi",
    "Brazil": "Brasilia", "Chile": "Santiago", "Poland": "Warsaw", "Portugal": "Lisbon", "Ireland": "Dublin",
    "Mexico": "Mexico City", "Austria": "Vienna", "Sweden": "Stockholm", "Finland": "Helsinki", "Cuba": "Havana",
}
ENCYCLOPEDIA = {
    "tallest mountain": "Mount Everest is the tallest mountain on Earth, 8849 m above sea level.",
    "largest ocean": "The Pacific is the largest ocean, covering about 165 million square km.",
    "speed of light": "Light travels at about 299792 km per second in a vacuum.",
    "boiling point of water": "Water boils at 100 degrees Celsius at sea level.",
    "longest river": "The Nile is usually called the longest river, about 6650 km long.",
    "author of Hamlet": "Hamlet was written by William Shakespeare around 1600.",
    "largest planet": "Jupiter is the largest planet in the Solar System.",
    "closest star": "Proxima Centauri is the closest star to the Sun, 4.2 light years away.",
    "deepest lake": "Lake Baikal in Siberia is the deepest lake, 1642 m deep.",
    "smallest country": "Vatican City is the smallest country, 0.44 square km.",
}
UNITS = {  # (from, to): factor (temperatures are handled apart)
    ("km", "mi"): 0.621371, ("mi", "km"): 1.609344, ("kg", "lb"): 2.204623, ("lb", "kg"): 0.453592,
    ("m", "ft"): 3.280840, ("ft", "m"): 0.3048, ("l", "gal"): 0.264172, ("gal", "l"): 3.785412,
}
UNIT_WORDS = {"km": "kilometers", "mi": "miles", "kg": "kilograms", "lb": "pounds", "m": "meters", "ft": "feet",
              "l": "liters", "gal": "gallons", "C": "degrees Celsius", "F": "degrees Fahrenheit"}
NAMES = ("Alice", "Bob", "Carla", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemal", "Lena",
         "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Viktor", "Wen", "Yara", "Zoe")
ITEMS = ("apples", "books", "coins", "marbles", "stamps", "pencils", "cards", "shells", "tickets", "eggs")
REAL_CITIES = (
    "Paris", "Tokyo", "Berlin", "Madrid", "Lisbon", "Cairo", "Nairobi", "Lima", "Oslo", "Athens", "Dublin", "Vienna",
    "Toronto", "Chicago", "Sydney", "Mumbai", "Istanbul", "Seoul", "Bangkok", "Hanoi", "Jakarta", "Manila", "Lagos",
    "Accra", "Dakar", "Casablanca", "Tunis", "Beirut", "Tehran", "Karachi", "Dhaka", "Kathmandu", "Denver", "Boston",
    "Seattle", "Austin", "Miami", "Havana", "Bogota", "Quito", "Santiago", "Montreal", "Vancouver", "Glasgow", "Porto",
    "Naples", "Munich", "Zurich", "Prague", "Krakow", "Riga", "Tallinn", "Helsinki", "Stockholm", "Bergen", "Cork",
)
# Never in training: the evaluation's cities (made-up and real).
HELD_OUT_CITIES = (
    "Velmora", "Quillbrook", "Tarsenvale", "Ombrith", "Kestrin Bay", "Dunmorrow", "Palvanto", "Zerithon",
    "Brackenhold", "Sulvaine", "Orrinford", "Maelstrand", "Yonderra", "Fenwick Hollow", "Istravel", "Corvantis",
    "Lindqvar", "Rothmere", "Xalapeno Verde", "Amberlyn", "Reykjavik", "Montevideo", "Ulaanbaatar", "Windhoek",
    "Tbilisi", "Ljubljana", "Asuncion", "Bratislava", "Kigali", "Thimphu",
)
_ONSETS = ("b", "br", "c", "ch", "d", "dr", "f", "g", "gl", "h", "j", "k", "kr", "l", "m", "n", "p", "pr", "qu", "r",
           "s", "sh", "st", "t", "th", "tr", "v", "w", "y", "z", "")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou", "y", "io")
_CODAS = ("", "", "n", "r", "l", "s", "m", "th", "x", "nd", "rk", "lt")
_PREFIXES = ("New ", "San ", "Port ", "Lake ", "Saint ", "Upper ", "North ", "Fort ")
_SUFFIXES = ("ville", "burg", "port", "ton", "field", "haven", "mouth", "stad", "grad", "polis", " City", " Springs")


def held_out_pair(a: int, b: int) -> bool:
    """One pair of operands in about ten is kept for evaluation (a fixed hash of the pair)."""
    return (a * 131 + b * 71 + a * b) % 10 == 3


def made_up_city(rng: random.Random) -> str:
    """A pronounceable invented city name (1-3 syllables, sometimes a prefix or suffix)."""
    name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                   for _ in range(rng.choice((1, 2, 2, 3))))
    name = name.capitalize()
    if rng.random() < 0.25:
        name += rng.choice(_SUFFIXES)
    if rng.random() < 0.15:
        name = rng.choice(_PREFIXES) + name
    return name


def weather_of(city: str) -> dict[str, Any]:
    """The (deterministic) weather the get_weather tool reports for ``city``."""
    code = sum(ord(ch) * (i + 7) for i, ch in enumerate(city))
    return {"city": city, "temperature_c": code % 41 - 5, "condition": CONDITIONS[code // 41 % len(CONDITIONS)]}


@dataclass
class Example:
    """One conversation: an OpenAI chat ``request`` (messages and the request fields that shape the prompt), the
    ``replies`` that follow it (assistant, tool, assistant ...), and ``expected``: what the first reply must hold to
    be right (``answer`` text in the content, the first ``tool_call``, or a ``json`` value). ``copied``: names the
    replies copy from the prompt (the trainer tokenizes them as the prompt does, see ``dsv32.train.demo``)."""

    task: str
    request: dict[str, Any]
    replies: list[dict[str, Any]]
    expected: dict[str, Any] = field(default_factory=dict)
    copied: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rendered:
    """The conversation's text as consecutive ``(text, trained)`` segments; trained ones are what the model writes."""

    segments: tuple[tuple[str, bool], ...]

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.segments)

    @property
    def prompt(self) -> str:
        """What the server prompts the model with for the first reply."""
        return self.segments[0][0]


def render(example: Example) -> Rendered:
    """The request rendered exactly as the server prompts it, then the replies; each assistant message (up to its
    end-of-sentence token) is one trained segment."""
    encoding = prepare_chat_request(**example.request)
    messages = encoding.messages + example.replies
    segments: list[tuple[str, bool]] = []
    done = ""
    for index in range(len(encoding.messages), len(messages)):
        if messages[index]["role"] != "assistant":
            continue
        before = encode_messages(messages[:index], encoding.thinking_mode, drop_thinking=False)
        after = encode_messages(messages[:index + 1], encoding.thinking_mode, drop_thinking=False)
        if not (before.startswith(done) and after.startswith(before)):
            raise AssertionError(f"message {index} of a {example.task} example does not extend the prompt")
        segments += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    return Rendered(tuple(segments))


def _call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _assistant(content: str = "", reasoning: str | None = None, calls: list[dict[str, Any]] | None = None,
               thinking: bool = False) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if thinking:
        message["reasoning_content"] = reasoning or ""
    if calls:
        message["tool_calls"] = calls
    return message


class _Generator:
    """Draws examples of one split from one seeded RNG."""

    def __init__(self, seed: int, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.rng = random.Random(seed)
        self.heldout = split == "heldout"

    # ---- shared pieces --------------------------------------------------------------------------------------
    def pair(self, low: int = 10, high: int = 99) -> tuple[int, int]:
        """Two operands; two-digit pairs respect the split."""
        while True:
            a, b = self.rng.randint(low, high), self.rng.randint(low, high)
            if not (10 <= a <= 99 and 10 <= b <= 99) or held_out_pair(a, b) == self.heldout:
                return a, b

    def city(self) -> str:
        if self.heldout:
            return self.rng.choice(HELD_OUT_CITIES)
        while True:
            city = self.rng.choice(REAL_CITIES) if self.rng.random() < 0.2 else made_up_city(self.rng)
            if city not in HELD_OUT_CITIES:
                return city

    def thinking(self, share: float = 0.5) -> bool:
        return self.rng.random() < share

    def request(self, user: str, thinking: bool, **fields: Any) -> dict[str, Any]:
        request: dict[str, Any] = {"messages": [{"role": "user", "content": user}], **fields}
        if thinking:
            request["chat_template_kwargs"] = {"thinking": True}
        elif self.rng.random() < 0.5:  # both ways of asking for no thinking render the same prompt
            request["chat_template_kwargs"] = {"thinking": False}
        return request

    # ---- arithmetic -----------------------------------------------------------------------------------------
    def arithmetic(self) -> Example:
        kind = self.rng.choices(("add", "sub", "mul", "add_small"), weights=(0.55, 0.2, 0.15, 0.1))[0]
        if kind == "mul":
            a, b = self.rng.randint(11, 99), self.rng.randint(2, 9)
            op, result, steps = "*", a * b, _multiplication_steps(a, b)
        else:
            a, b = self.pair(1, 9) if kind == "add_small" else self.pair()
            if kind == "sub":
                a, b = max(a, b), min(a, b)
                op, result, steps = "-", a - b, _subtraction_steps(a, b)
            else:
                op, result, steps = "+", a + b, _addition_steps(a, b)
        thinking = self.thinking(0.75)
        if self.rng.random() < 0.3 and op != "*":
            question, answer = self.word_problem(a, b, op, result)
        else:
            question = self.rng.choice(("What is {a} {op} {b}?", "What is {a} {op} {b}?", "Compute {a} {op} {b}.",
                                        "{a} {op} {b} = ?", "How much is {a} {op} {b}?", "Calculate {a} {op} {b}."))
            question = question.format(a=a, op=op, b=b)
            answer = self.rng.choice(("{a} {op} {b} = {r}.", "The answer is {r}.", "{a} {op} {b} is {r}."))
            answer = answer.format(a=a, op=op, b=b, r=result)
        reasoning = f"{a} {op} {b}: {steps} So {a} {op} {b} = {result}."
        return Example("arithmetic", self.request(question, thinking),
                       [_assistant(answer, reasoning, thinking=thinking)], {"answer": str(result)})

    def word_problem(self, a: int, b: int, op: str, result: int) -> tuple[str, str]:
        name, item = self.rng.choice(NAMES), self.rng.choice(ITEMS)
        if op == "+":
            question = self.rng.choice((
                f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
                f"There are {a} {item} in one box and {b} in another. How many {item} are there in total?"))
            return question, f"There are {result} {item}." if "total" in question else f"{name} has {result} {item}."
        question = f"{name} had {a} {item} and gave away {b}. How many {item} are left?"
        return question, f"{name} has {result} {item} left."

    # ---- tools ----------------------------------------------------------------------------------------------
    def toolset(self, needed: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
        """The tools offered: often exactly the acceptance check's pair, else the needed ones among a shuffled
        selection."""
        if self.rng.random() < 0.45 and all(t in (GET_WEATHER, CALCULATOR) for t in needed):
            return [GET_WEATHER, CALCULATOR]
        others = [t for t in ALL_TOOLS if t not in needed]
        tools = list(needed) + self.rng.sample(others, self.rng.randint(0, len(others)))
        self.rng.shuffle(tools)
        return tools

    def tools(self) -> Example:
        kind = self.rng.choices(("weather", "weather2", "calculator", "units", "search", "mixed", "no_tool", "none"),
                                weights=(0.34, 0.1, 0.12, 0.1, 0.1, 0.08, 0.08, 0.08))[0]
        return getattr(self, f"tool_{kind}")(self.thinking(0.4))

    def _tool_example(self, user: str, thinking: bool, needed: tuple[dict[str, Any], ...],
                      calls: list[dict[str, Any]], results: list[str], plan: str, summary: str,
                      answer: str, copied: tuple[str, ...] = ()) -> Example:
        """A question answered by ``calls`` (one turn), their ``results``, then the final ``answer``."""
        replies = [_assistant("", plan, calls, thinking)]
        replies += [{"role": "tool", "content": result} for result in results]
        replies.append(_assistant(answer, summary, thinking=thinking))
        first = calls[0]["function"]
        expected = {"tool_call": {"name": first["name"], "arguments": json.loads(first["arguments"])}}
        return Example("tools", self.request(user, thinking, tools=self.toolset(needed)), replies, expected, copied)

    def tool_weather(self, thinking: bool) -> Example:
        city = self.city()
        weather = weather_of(city)
        user = self.rng.choice((
            "What's the weather like in {c}?", "What's the weather like in {c}?", "What is the weather in {c}?",
            "How is the weather in {c} today?", "Is it raining in {c}?", "Tell me the weather in {c}.",
            "weather in {c}?")).format(c=city)
        temp, cond = weather["temperature_c"], weather["condition"]
        return self._tool_example(
            user, thinking, (GET_WEATHER,), [_call("get_weather", city=city)], [json.dumps(weather)],
            f"The user asks about the weather in {city}. I will call get_weather with city {city}.",
            f"get_weather says {city} is {cond} at {temp} degrees Celsius.",
            f"In {city} it is currently {cond} with {temp} °C.", (city,))

    def tool_weather2(self, thinking: bool) -> Example:
        first, second = self.city(), self.city()
        while second == first:
            second = self.city()
        w1, w2 = weather_of(first), weather_of(second)
        user = self.rng.choice(("Compare the weather in {a} and {b}.", "What's the weather in {a} and in {b}?",
                                "Is it warmer in {a} or in {b}?")).format(a=first, b=second)
        warmer = first if w1["temperature_c"] >= w2["temperature_c"] else second
        return self._tool_example(
            user, thinking, (GET_WEATHER,), [_call("get_weather", city=first), _call("get_weather", city=second)],
            [json.dumps(w1), json.dumps(w2)],
            f"I need the weather in two cities: {first} and {second}. I will call get_weather twice.",
            f"{first}: {w1['condition']}, {w1['temperature_c']} C. {second}: {w2['condition']}, "
            f"{w2['temperature_c']} C. {warmer} is warmer.",
            f"In {first} it is {w1['condition']} with {w1['temperature_c']} °C; in {second} it is "
            f"{w2['condition']} with {w2['temperature_c']} °C. {warmer} is warmer.", (first, second))

    def expression(self) -> tuple[str, int]:
        a, b = self.pair(10, 999)
        op = self.rng.choice(("+", "-", "*"))
        expression = f"{a} {op} {b}"
        if self.rng.random() < 0.2:
            c = self.rng.randint(2, 9)
            expression, value = f"({a} {op} {b}) * {c}", _apply(a, op, b) * c
        else:
            value = _apply(a, op, b)
        return expression, value

    def tool_calculator(self, thinking: bool) -> Example:
        expression, value = self.expression()
        user = self.rng.choice(("Use the calculator to compute {e}.", "Calculate {e} with the calculator.",
                                "What is {e}? Use a tool.", "Please evaluate {e}.")).format(e=expression)
        return self._tool_example(
            user, thinking, (CALCULATOR,), [_call("calculator", expression=expression)], [str(value)],
            f"I will evaluate {expression} with the calculator.", f"The calculator returned {value}.",
            f"{expression} = {value}.")

    def tool_units(self, thinking: bool) -> Example:
        if self.rng.random() < 0.2:
            src, dst = self.rng.choice((("C", "F"), ("F", "C")))
            value = self.rng.randint(-20, 110)
            converted = round(value * 9 / 5 + 32 if src == "C" else (value - 32) * 5 / 9, 2)
        else:
            src, dst = self.rng.choice(sorted(UNITS))
            value = self.rng.randint(1, 500)
            converted = round(value * UNITS[(src, dst)], 2)
        user = self.rng.choice(("Convert {v} {s} to {d}.", "How many {dw} is {v} {sw}?",
                                "What is {v} {sw} in {dw}?")).format(v=value, s=src, d=dst, sw=UNIT_WORDS[src],
                                                                     dw=UNIT_WORDS[dst])
        return self._tool_example(
            user, thinking, (CONVERT_UNITS,), [_call("convert_units", value=value, from_unit=src, to_unit=dst)],
            [json.dumps({"value": converted, "unit": dst})],
            f"I will convert {value} {src} to {dst} with convert_units.", f"The result is {converted} {dst}.",
            f"{value} {UNIT_WORDS[src]} is {converted} {UNIT_WORDS[dst]}.")

    def tool_search(self, thinking: bool) -> Example:
        topic = self.rng.choice(sorted(ENCYCLOPEDIA))
        user = self.rng.choice(("Search for the {t}.", "Look up the {t}.", "What do you know about the {t}? "
                                "Search it.")).format(t=topic)
        fact = ENCYCLOPEDIA[topic]
        return self._tool_example(
            user, thinking, (SEARCH,), [_call("search", query=topic)], [fact],
            f"I will search the encyclopedia for {topic}.", "The search found the answer.", fact)

    def tool_mixed(self, thinking: bool) -> Example:
        city = self.city()
        expression, value = self.expression()
        weather = weather_of(city)
        user = f"What's the weather in {city}, and what is {expression}?"
        return self._tool_example(
            user, thinking, (GET_WEATHER, CALCULATOR),
            [_call("get_weather", city=city), _call("calculator", expression=expression)],
            [json.dumps(weather), str(value)],
            f"Two things: the weather in {city} (get_weather) and {expression} (calculator).",
            f"{city} is {weather['condition']}, {weather['temperature_c']} C; {expression} = {value}.",
            f"In {city} it is {weather['condition']} with {weather['temperature_c']} °C, and {expression} = {value}.",
            (city,))

    def tool_no_tool(self, thinking: bool) -> Example:
        """Tools offered, none needed: the answer is text."""
        user, answer = self.chat_turn()
        request = self.request(user, thinking, tools=self.toolset((GET_WEATHER,)))
        reasoning = "No tool is needed for this."
        return Example("tools", request, [_assistant(answer, reasoning, thinking=thinking)], {"answer": answer})

    def tool_none(self, thinking: bool) -> Example:
        """``tool_choice: "none"``: no tools are rendered; a weather question gets a plain answer."""
        city = self.city()
        request = self.request(f"What's the weather like in {city}?", thinking, tools=[GET_WEATHER, CALCULATOR],
                               tool_choice="none")
        answer = f"I cannot check the current weather in {city} right now."
        reasoning = f"I have no tool to look up the weather in {city}."
        return Example("tools", request, [_assistant(answer, reasoning, thinking=thinking)], {"answer": answer})

    # ---- JSON -----------------------------------------------------------------------------------------------
    def json(self) -> Example:
        kind = self.rng.choice(("person", "sum", "capitals", "compare"))
        city = ""
        if kind == "person":
            name, age, city = self.rng.choice(NAMES), self.rng.randint(18, 90), self.city()
            keys = (self.rng.choice(("name", "full_name", "person")), self.rng.choice(("age", "years")),
                    self.rng.choice(("city", "home", "location")))
            user = f"{name} is {age} years old and lives in {city}. Extract the person as JSON."
            value: dict[str, Any] = dict(zip(keys, (name, age, city), strict=True))
            types = ("string", "integer", "string")
        elif kind == "sum":
            a, b = self.pair()
            keys = (self.rng.choice(("expression", "question")), self.rng.choice(("result", "answer", "sum")))
            user = f"What is {a} + {b}? Reply in JSON."
            value, types = dict(zip(keys, (f"{a} + {b}", a + b), strict=True)), ("string", "integer")
        elif kind == "capitals":
            countries = self.rng.sample(sorted(CAPITALS), self.rng.randint(1, 3))
            keys = (self.rng.choice(("capitals", "cities", "answer")),)
            user = f"List the capitals of {' and '.join(countries)} as JSON."
            value, types = {keys[0]: [CAPITALS[c] for c in countries]}, ("array",)
        else:
            a, b = self.pair(1, 999)
            keys = (self.rng.choice(("greater", "answer", "is_greater")),)
            user = f"Is {a} greater than {b}? Answer in JSON."
            value, types = {keys[0]: a > b}, ("boolean",)
        string_list = {"type": "array", "items": {"type": "string"}}
        properties = {key: string_list if type_name == "array" else {"type": type_name}
                      for key, type_name in zip(keys, types, strict=True)}
        schema = {"type": "object", "properties": properties, "required": list(keys)}
        thinking = self.thinking(0.4)
        response_format = {"type": "json_schema", "json_schema": {"name": f"{kind}_answer", "schema": schema}}
        reasoning = f"The schema asks for {', '.join(keys)}."
        content = json.dumps(value, ensure_ascii=False)
        return Example("json", self.request(user, thinking, response_format=response_format),
                       [_assistant(content, reasoning, thinking=thinking)], {"json": value, "schema": schema},
                       (city,) if kind == "person" else ())

    # ---- chat -----------------------------------------------------------------------------------------------
    def chat_turn(self) -> tuple[str, str]:
        kind = self.rng.choice(("greeting", "capital", "capital", "identity", "thanks"))
        if kind == "greeting":
            return (self.rng.choice(("Hi!", "Hello", "Hello!", "Good morning!", "Hey there", "Hi, how are you?")),
                    self.rng.choice(("Hello! How can I help you today?", "Hi! What can I do for you?")))
        if kind == "capital":
            country = self.rng.choice(sorted(CAPITALS))
            question = self.rng.choice(("What is the capital of {c}?", "Capital of {c}?", "Which city is the capital "
                                        "of {c}?")).format(c=country)
            return question, f"The capital of {country} is {CAPITALS[country]}."
        if kind == "identity":
            return (self.rng.choice(("Who are you?", "What are you?")),
                    "I am a small demo model with the DeepSeek-V3.2 architecture, trained by dsv32 on a synthetic "
                    "corpus. I can do arithmetic, call tools and answer in JSON.")
        return self.rng.choice(("Thanks!", "Thank you.", "Thanks a lot")), "You're welcome!"

    def chat(self) -> Example:
        user, answer = self.chat_turn()
        thinking = self.thinking(0.3)
        return Example("chat", self.request(user, thinking),
                       [_assistant(answer, "A short reply is enough.", thinking=thinking)], {"answer": answer})


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _addition_steps(a: int, b: int) -> str:
    ones = a % 10 + b % 10
    carry = ones // 10
    steps = f"ones: {a % 10} + {b % 10} = {ones}" + (f", write {ones % 10}, carry 1;" if carry else ";")
    tens = a // 10 + b // 10 + carry
    if a >= 10 or b >= 10 or carry:
        steps += f" tens: {a // 10} + {b // 10}" + (" + 1" if carry else "") + f" = {tens}."
    return steps


def _subtraction_steps(a: int, b: int) -> str:
    if a % 10 >= b % 10:
        steps = f"ones: {a % 10} - {b % 10} = {a % 10 - b % 10};"
        borrow = 0
    else:
        steps = f"ones: {a % 10} < {b % 10}, borrow: {a % 10 + 10} - {b % 10} = {a % 10 + 10 - b % 10};"
        borrow = 1
    return steps + f" tens: {a // 10}" + (" - 1" if borrow else "") + f" - {b // 10} = {a // 10 - borrow - b // 10}."


def _multiplication_steps(a: int, b: int) -> str:
    tens, ones = a // 10 * 10, a % 10
    return f"{tens} * {b} = {tens * b}, {ones} * {b} = {ones * b}, {tens * b} + {ones * b} = {a * b}."


def examples(count: int, seed: int = 0, split: str = "train", tasks: tuple[str, ...] = TASKS) -> Iterator[Example]:
    """``count`` examples of ``split`` drawn from ``tasks`` (in ``TASK_WEIGHTS`` proportion), reproducible from
    ``seed``."""
    generator = _Generator(seed, split)
    makers: dict[str, Callable[[], Example]] = {"arithmetic": generator.arithmetic, "tools": generator.tools,
                                                "json": generator.json, "chat": generator.chat}
    unknown = sorted(set(tasks) - set(makers))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; expected some of {TASKS}")
    weights = [TASK_WEIGHTS[TASKS.index(task)] for task in tasks]
    for _ in range(count):
        yield makers[generator.rng.choices(tasks, weights=weights)[0]]()
