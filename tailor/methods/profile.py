"""Writing a user's history into prompt text: the token-budgeted history block and the P2P profile summary.

The history block follows LaMP's RAG prompt: each item in the task's template, the token budget shared equally
between items and what a short item leaves unused carried over to the next. The profile summary is written by the
backbone with the user-profile prompt of Profile-to-PEFT (appendix J), and is cached on disk per model, task and
history, because it is the most expensive thing a prompting method computes.
"""

from __future__ import annotations

from typing import Sequence

from tailor.backbone.cache import cached_generate
from tailor.backbone.model import Backbone
from tailor.backbone.textcache import TextCache
from tailor.methods.base import Progress
from tailor.tasks.lamp import Task
from tailor.tasks.records import HistoryItem, User

PROFILER_PROMPT = """# Instruction
Generate a targeted user profile for {task_description} based on the provided user history data. This profile will be used to understand user behavior patterns specific to this task.
IMPORTANT: You must analyze HOW this user behaves and makes decisions relevant to this task, NOT list WHAT specific content they interact with. Do not output lists of topics, keywords, or content examples. Focus only on behavioral tendencies, preferences, and decision-making patterns relevant to the target task. Focus on understanding patterns that inform task-specific user behavior:

1. Task-Relevant User Preferences:
  - Decision-making patterns and criteria relevant to the target task
  - Quality and content preferences that influence choices
  - Style and approach preferences in task-related activities
  - Consistency patterns in task-related decision making
2. Behavioral Patterns Related to Task Performance:
  - Interaction patterns and engagement styles relevant to the task
  - Response patterns to different types of content or options
  - Timing and frequency patterns in task-related activities
  - Adaptation patterns when encountering new or different scenarios
3. Personal Style and Voice Indicators:
  - Communication style patterns relevant to the task
  - Personal expression tendencies and voice characteristics
  - Authenticity markers and personal touch preferences
  - Consistency in personal style across different contexts
4. Context Awareness and Adaptation Patterns:
  - Awareness of audience, context, or requirements in task-related activities
  - Adaptation strategies for different scenarios within the task domain
  - Personalization approaches and individual preference integration
  - Balance between task requirements and personal style

# User History Data: {user_history}

# Output Format
Output the user profile strictly in plain text describing the user's behavioral patterns, preferences, and decision-making tendencies specifically relevant to {task_description}. Focus on patterns that predict how this user would approach and perform the target task.
Do NOT output:

- Lists of topics, keywords, or content they engage with
- Specific examples of content, products, or interactions
- Names of people, places, brands, or entities
- Content examples or subject matter details

DO output:

- Behavioral patterns and preferences relevant to the task
- Decision-making tendencies and criteria
- Personal style and approach patterns
- Task-specific interaction patterns

Derive insights strictly from the provided historical data. Do not include explanations, introductions, headings, bullet points, or any formatting structure."""


def format_history(task: Task, backbone: Backbone, items: Sequence[HistoryItem], budget: int) -> list[str]:
    """Items in the task's template with their long field cut so that all of them fit in `budget` tokens."""
    if not items:
        return []
    share = budget // len(items)
    carry = 0
    formatted = []
    for item in items:
        overhead = backbone.count_tokens(task.format_item(item, body=""))
        allowance = max(share + carry - overhead, 0)
        body = backbone.truncate_tokens(item[task.body_field], allowance)
        carry = share + carry - overhead - backbone.count_tokens(body)
        formatted.append(task.format_item(item, body=body))
    return formatted


def newest_that_fit(task: Task, backbone: Backbone, items: Sequence[HistoryItem], budget: int) -> list[str]:
    """Whole items, newest first, for as long as they fit in `budget` tokens (the full-history prompt)."""
    formatted, used = [], 0
    for item in reversed(items):
        text = task.format_item(item)
        cost = backbone.count_tokens(text) + 2
        if used + cost > budget:
            break
        formatted.append(text)
        used += cost
    return formatted


class ProfileSummarizer:
    """Writes (and caches) the P2P profiler summary of a user's history."""

    def __init__(self, task: Task, backbone: Backbone, items: int = 16, history_tokens: int = 768,
                 max_new_tokens: int = 128, batch_size: int = 4, cache: TextCache | None = None):
        self.task = task
        self.backbone = backbone
        self.items = items
        self.history_tokens = history_tokens
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.cache = cache or TextCache()

    def prompt(self, user: User) -> str:
        newest = list(user.profile[-self.items:])
        history = "\n".join(format_history(self.task, self.backbone, newest, self.history_tokens))
        return PROFILER_PROMPT.format(task_description=self.task.description, user_history=history)

    def summaries(self, users: Sequence[User], progress: Progress = None) -> list[str]:
        """One summary per user; only users whose (model, prompt) pair is not cached are generated, in batches
        (`progress` is told how many more users have theirs)."""
        return cached_generate(self.backbone, [self.prompt(u) for u in users], self.max_new_tokens, self.batch_size,
                               self.cache, progress)
