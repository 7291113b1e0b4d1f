"""The native API's routes, one router per concern, each built for a `Deployment`: `meta` (page, health, info),
`users` (history, state, personalize jobs) and `predict`."""
