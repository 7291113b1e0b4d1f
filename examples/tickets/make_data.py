"""Write the example's synthetic users: `python examples/tickets/make_data.py` rewrites train.jsonl and dev.jsonl.

Each user is a support agent who triages tickets. A ticket's theme sets its usual priority, and every agent shifts
some themes up or down by habit (one escalates every billing ticket, another never calls anything urgent), so an
agent's own history says more about their next answer than the text alone: what personalization is for. Seeded, so
a rerun writes the same files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PRIORITIES = ("low", "normal", "high", "urgent")
THEMES = {  # theme: (usual priority, ticket texts)
    "outage": (3, ["{system} is down for the whole {team} team", "nobody in {team} can reach {system}",
                   "{system} returns 503 for every request"]),
    "security": (3, ["suspicious password reset emails about {system}", "a stranger's login shows up in {system}"]),
    "login": (2, ["I cannot log in to {system} since this morning", "{system} rejects my password after the reset"]),
    "billing": (2, ["invoice {number} charges us twice for {system}",
                    "our {system} plan was billed at the wrong rate"]),
    "bug": (1, ["{system} shows an error when I export a report",
                "the {team} dashboard in {system} shows old numbers"]),
    "slow": (1, ["{system} is very slow when loading the dashboard", "search in {system} takes a minute"]),
    "howto": (0, ["how do I change my notification settings in {system}?", "where do I find last month's report in "
                  "{system}?"]),
    "feature": (0, ["could {system} support dark mode?", "please add a CSV export to {system}"]),
}
SYSTEMS = ("the VPN", "Outlook", "the CRM", "the billing portal", "Jira", "the wiki", "the HR portal")
TEAMS = ("sales", "finance", "support", "marketing", "engineering")


def ticket(rng: random.Random, habits: dict[str, int]) -> tuple[str, str]:
    theme = rng.choice(sorted(THEMES))
    usual, texts = THEMES[theme]
    text = rng.choice(texts).format(system=rng.choice(SYSTEMS), team=rng.choice(TEAMS),
                                    number=rng.randint(10000, 99999))
    level = usual + habits.get(theme, 0) + (rng.choice((-1, 1)) if rng.random() < 0.1 else 0)
    return text[0].upper() + text[1:], PRIORITIES[min(max(level, 0), 3)]


def agent(rng: random.Random, user_id: str, queries: int) -> dict:
    habits = {theme: rng.choice((-2, -1, 1, 2)) for theme in rng.sample(sorted(THEMES), rng.randint(1, 3))}
    tickets = [ticket(rng, habits) for _ in range(rng.randint(6, 10) + queries)]
    dates = [f"2024-{1 + i // 28:02d}-{1 + i % 28:02d}" for i in sorted(rng.sample(range(300), len(tickets)))]
    history = [{"id": f"{user_id}-t{i:02d}", "text": text, "priority": priority, "date": date}
               for i, ((text, priority), date) in enumerate(zip(tickets[:-queries], dates))]
    asked = [{"id": f"{user_id}-q{j}", "input": text, "gold": priority}
             for j, (text, priority) in enumerate(tickets[-queries:])]
    return {"id": user_id, "history": history, "queries": asked}


def main() -> None:
    rng = random.Random(0)
    here = Path(__file__).parent
    for split, count, first in (("train", 24, 0), ("dev", 12, 24)):
        users = [agent(rng, f"agent-{first + n:03d}", rng.randint(1, 2)) for n in range(count)]
        (here / f"{split}.jsonl").write_text("".join(json.dumps(u) + "\n" for u in users))


if __name__ == "__main__":
    main()
