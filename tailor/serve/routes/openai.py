"""The OpenAI-compatible API over every deployment: `GET /v1/models`, `POST /v1/chat/completions` and
`POST /v1/completions`, so that the OpenAI client (or anything written for vLLM or LoRAX) talks to personalized models.

`model` names a deployment and `user` the end user whose personalized model answers; the question is the last user
message (chat; system messages and earlier turns are not read) or the prompt (completions), as in `/v1/predict`. A
user who is unknown, or has no state yet, is an error (404, 409), never a silent answer of the base model; that is
asked for by name, `<deployment>:base`. A classification or rating deployment answers with its label, the label
scores in `tailor.scores`; a generation deployment generates with `max_tokens`, `temperature`, `top_p`, `seed` and
`stop`. `stream: true` answers in OpenAI's server-sent chunks, ending with `data: [DONE]`: the role first, at once,
then each choice's text when its row is answered (rows are answered whole, in one batch with other requests, so the
text comes in one chunk), then its finish reason. Every answer carries `tailor`: the deployment, the user, and
whether their state was stale.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures, whose types are local to `router`.
import asyncio
import json
import secrets
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Annotated, Any, AsyncIterator

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from tailor.backbone.model import Sampling
from tailor.serve.batcher import QueueFull
from tailor.serve.deployment import Answer, Deployment, Row, Work
from tailor.serve.errors import ApiError
from tailor.serve.openai_schemas import (ChatCompletion, ChatRequest, Completion, CompletionRequest, Message,
                                         ModelCard, ModelInfo, ModelList, Sampled, TailorInfo)
from tailor.serve.schemas import responses
from tailor.serve.server import BASE_SUFFIX, Server
from tailor.store.state import UserState
from tailor.tasks.records import Query

ERRORS = responses(401, 404, 409, 413, 422, 503)


@dataclass(frozen=True)
class Kind:
    """Chat or text completions: what their objects are called and where a choice's text goes."""

    chat: bool

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def choice(self, index: int, text: str, finish: str) -> dict[str, Any]:
        body = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        return {"index": index, **body, "finish_reason": finish, "logprobs": None}

    def delta(self, index: int, text: str | None, finish: str | None = None) -> dict[str, Any]:
        """A streamed chunk's choice: the role (chat, text None), some text, or the end (finish)."""
        if not self.chat:
            return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
        delta = {} if finish else {"role": "assistant", "content": ""} if text is None else {"content": text}
        return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}


CHAT, TEXT = Kind(True), Kind(False)


def last_user_text(messages: list[Message]) -> str:
    """The question of a chat: the text of its last user message (of its last message, when none is the user's);
    system messages and earlier turns are not read."""
    message = next((m for m in reversed(messages) if m.role == "user"), messages[-1])
    content = message.content
    return content if isinstance(content, str) else "\n".join(
        part.text for part in content or [] if part.type == "text" and part.text)


class Reply:
    """One completion's answer, whole or streamed."""

    def __init__(self, kind: Kind, model: str, info: TailorInfo, max_tokens: int):
        self.kind, self.model, self.info, self.max_tokens = kind, model, info, max_tokens
        self.id = f"{'chatcmpl' if kind.chat else 'cmpl'}-{secrets.token_hex(12)}"
        self.created = int(time.time())

    def finish(self, answer: Answer) -> str:
        return "length" if (answer.completion_tokens or 0) >= self.max_tokens else "stop"

    def tailor(self, answers: list[Answer]) -> dict[str, Any]:
        scores: Any = [a.scores for a in answers] if not self.kind.chat else answers[0].scores
        return self.info.model_copy(update={"mode": answers[0].mode, "scores": scores}).model_dump()

    @staticmethod
    def usage(answers: list[Answer]) -> dict[str, int] | None:
        if any(a.prompt_tokens is None or a.completion_tokens is None for a in answers):
            return None
        prompt = sum(a.prompt_tokens or 0 for a in answers)
        completion = sum(a.completion_tokens or 0 for a in answers)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _head(self, chunk: bool) -> dict[str, Any]:
        return {"id": self.id, "object": self.kind.object + (".chunk" if chunk and self.kind.chat else ""),
                "created": self.created, "model": self.model}

    def whole(self, answers: list[Answer]) -> dict[str, Any]:
        choices = [self.kind.choice(i, a.text, self.finish(a)) for i, a in enumerate(answers)]
        return {**self._head(False), "choices": choices, "usage": self.usage(answers), "tailor": self.tailor(answers)}

    async def events(self, futures: list[Future], include_usage: bool) -> AsyncIterator[str]:
        def event(body: dict[str, Any]) -> str:
            return f"data: {json.dumps(body)}\n\n"

        answers: list[Answer] = []
        try:
            if self.kind.chat:
                yield event({**self._head(True), "choices": [self.kind.delta(0, None)]})
            for index, future in enumerate(futures):
                try:
                    answer = await asyncio.wrap_future(future)
                except Exception:
                    yield event(ApiError(500, "internal", "answering failed; the server log has the details")
                                .to_json())
                    break
                answers.append(answer)
                yield event({**self._head(True), "choices": [self.kind.delta(index, answer.text)]})
                last = index == len(futures) - 1
                yield event({**self._head(True), "choices": [self.kind.delta(index, None, self.finish(answer))],
                             **({"tailor": self.tailor(answers)} if last else {})})
            else:
                if include_usage:
                    yield event({**self._head(True), "choices": [], "usage": self.usage(answers)})
            yield "data: [DONE]\n\n"
        finally:
            for future in futures:  # a client that left stops waiting for rows not answered yet
                future.cancel()


def router(server: Server) -> APIRouter:
    routes = APIRouter(tags=["OpenAI-compatible"])
    Tenant = Annotated[str, Depends(server.tenant_of)]

    def card(deployment: Deployment) -> ModelCard:
        method, task = deployment.method, deployment.task
        info = ModelInfo(task=task.name, method=method.name, backbone=method.model_id,
                         default=deployment is server.default,
                         base=deployment.name + BASE_SUFFIX if deployment.base is not None else None,
                         native=deployment.prefix, labels=list(task.labels), item_fields=list(task.item_fields))
        return ModelCard(id=deployment.name, created=server.started, tailor=info)

    @routes.get("/v1/models", response_model=ModelList, responses=responses(401),
                summary="The deployments, each an OpenAI model")
    def models(tenant: Tenant) -> ModelList:
        return ModelList(data=[card(d) for d in server.deployments.values()])

    def state_for(tenant: str, deployment: Deployment, user: str) -> tuple[UserState, TailorInfo]:
        record = deployment.records(tenant, [user]).get(user)
        state = deployment.state_of(tenant, user, record, "user")
        assert record is not None
        info = TailorInfo(deployment=deployment.name, user=user, personalized=True, stale=record.stale,
                          history_items=record.items, state_items=record.state_items, mode="")
        return state, info

    async def complete(tenant: str, body: Sampled, texts: list[str], kind: Kind) -> Any:
        deployment, personalized = server.model(body.model)
        limits = deployment.limits
        if len(texts) > limits.max_requests:
            raise ApiError(413, "too_long", f"{len(texts)} prompts in one call; at most {limits.max_requests}",
                           param="prompt")
        where = "messages" if kind.chat else "prompt"
        questions = [deployment.check_query(text, where) for text in texts]
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stop) > 4:
            raise ApiError(422, "malformed", f"{len(stop)} stop strings; at most 4", param="stop")
        max_tokens = body.max_completion_tokens or body.max_tokens or deployment.default_tokens(personalized)
        if max_tokens > limits.max_tokens:
            raise ApiError(413, "too_long", f"max_tokens {max_tokens}; at most {limits.max_tokens}",
                           param="max_tokens")
        if personalized:
            if body.user is None:
                raise ApiError(422, "missing_user", f"{body.model} answers as one of your users: give `user`, their "
                               f"id, or ask {body.model}{BASE_SUFFIX} for the model without personalization",
                               param="user")
            state, info = await run_in_threadpool(state_for, tenant, deployment, body.user)
        else:
            assert deployment.base_state is not None
            state = deployment.base_state
            info = TailorInfo(deployment=deployment.name, user=body.user, personalized=False, stale=False, mode="")
        sampling = Sampling(body.temperature, body.top_p, body.seed, stop)
        work = Work(deployment.name, personalized, max_tokens if deployment.generates(personalized) else 0)
        rows = [(work, Row(state, Query(f"{body.user or '-'}/{i}", q), sampling)) for i, q in enumerate(questions)]
        try:
            futures = deployment.batcher.submit(rows)
        except QueueFull as error:
            raise ApiError(503, "queue_full", str(error), {"Retry-After": "1"}) from None
        if info.stale:
            server.metrics.stale_answers.labels(deployment.name).inc()
        reply = Reply(kind, body.model, info, max_tokens)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(reply.events(futures, usage), media_type="text/event-stream")
        return reply.whole(list(await asyncio.gather(*map(asyncio.wrap_future, futures))))

    @routes.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERRORS,
                 summary="The user's personalized model answers the last user message")
    async def chat_completions(body: ChatRequest, tenant: Tenant) -> Any:
        return await complete(tenant, body, [last_user_text(body.messages)], CHAT)

    @routes.post("/v1/completions", response_model=Completion, responses=ERRORS,
                 summary="The user's personalized model answers each prompt")
    async def completions(body: CompletionRequest, tenant: Tenant) -> Any:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        return await complete(tenant, body, prompts, TEXT)

    return routes
