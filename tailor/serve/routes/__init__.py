"""The routes, one router per concern: `meta` (page, health, metrics, info), `openai` (the OpenAI-compatible API over
every deployment), and, for each deployment, `users` (history, state, personalize jobs) and `predict` (the native
API)."""
