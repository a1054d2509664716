"""The gateway's half of request migration (:class:`moestack.api.migration.Migrator`) over a
scripted backend that answers as a resumable replica does (token ids on its chunks) and fails
mid-stream as a dead replica does (:class:`EngineUnavailableError`). The real engine's half and
the end-to-end text equality are in ``tests/integration/test_migration_vllm.py``."""

import asyncio
import json

import pytest

from moestack.api.migration import Migrator
from moestack.engine.protocol import EngineChunk, EngineRequest
from moestack.engine.resume import resumable
from moestack.errors import EngineUnavailableError, ReplicaDrainingError
from moestack.testing import fake_config
from moestack.usage import Usage

CHAT = "/v1/chat/completions"
HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m"}


def sse(*events) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode())
                    + b"\n\n" for e in events)


def chat_event(text, finish=None):
    return {**HEAD, "choices": [{"index": 0, "delta": {"content": text}, "logprobs": None,
                                 "finish_reason": finish, "token_ids": None}]}


def completion_event(text, ids, finish=None):
    return {"id": "cmpl-9", "object": "text_completion", "created": 99, "model": "m",
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                         "stop_reason": None, "prompt_token_ids": None, "token_ids": ids}]}


class Scripted:
    """Original stream: role, 'a' (10), 'b' (11), then the replica dies. Resumes answer 'c' (12),
    'd' (13, length) with the engine's usage, unless ``resume_fails``."""

    def __init__(self, resume_fails: int = 0, finish_before_death: bool = False,
                 death: EngineUnavailableError | None = None, stall_s: float = 0.0):
        self.requests: list[EngineRequest] = []
        self.resume_fails = resume_fails
        self.finish_before_death = finish_before_death
        self.death = death or EngineUnavailableError("the model replica failed: RayActorError")
        self.stall_s = stall_s
        """Before dying: how long the replica sends nothing (as a hung one does)."""

    async def serve(self, model, request):
        self.requests.append(request)
        if request.path == CHAT:
            role = {**HEAD, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                               "content": ""},
                                     "logprobs": None, "finish_reason": None}]}
            yield EngineChunk(sse(role), Usage(3, 0), 200, "text/event-stream",
                              prompt_token_ids=(1, 2, 3))
            yield EngineChunk(sse(chat_event("a")), Usage(3, 1), token_ids=(10,))
            last = chat_event("b", "length" if self.finish_before_death else None)
            yield EngineChunk(sse(last), Usage(3, 2), token_ids=(11,))
            await asyncio.sleep(self.stall_s)
            raise self.death
        if self.resume_fails:
            self.resume_fails -= 1
            raise EngineUnavailableError("no replica")
        yield EngineChunk(sse(completion_event("c", [12])), Usage(5, 1), 200,
                          "text/event-stream", token_ids=(12,), prompt_token_ids=(1, 2, 3, 10, 11))
        yield EngineChunk(sse(completion_event("d", [13], "length"),
                              {"id": "cmpl-9", "object": "text_completion", "created": 99,
                               "model": "m", "choices": [],
                               "usage": {"prompt_tokens": 5, "completion_tokens": 2,
                                         "total_tokens": 7}}, b"[DONE]"),
                          Usage(5, 2), token_ids=(13,))


def request(**body):
    return EngineRequest("r1", CHAT, json.dumps({
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        "temperature": 0, "seed": 5, "stream": True, "stream_options": {"include_usage": True},
        **body}).encode())


async def collect(migrator, req):
    chunks = [c async for c in migrator.serve("m", req)]
    events = [json.loads(line[6:]) for c in chunks for line in c.data.decode().split("\n")
              if line.startswith("data: {")]
    return chunks, events


def migrator(backend, attempts=2, stall_timeout_s=60.0):
    m = Migrator(fake_config(gateway={"migration": {"max_attempts": attempts,
                                                    "stall_timeout_s": stall_timeout_s},
                                      "first_token_timeout_s": 5}), backend)
    m.seen = []
    m.reasons = []
    m.on_migrated = lambda model, tokens, reason: (m.seen.append((model, tokens)),
                                                   m.reasons.append(reason))
    return m


async def test_resumes_a_failed_stream_in_the_original_shape_billing_each_token_once():
    backend = Scripted()
    mig = migrator(backend)
    chunks, events = await collect(mig, request())
    text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    assert text == "abcd"
    assert {(e["id"], e["created"], e["object"]) for e in events} == {
        ("chatcmpl-1", 7, "chat.completion.chunk")}
    assert [c["finish_reason"] for e in events for c in e["choices"]][-1] == "length"
    assert events[-1]["usage"] == {"prompt_tokens": 3, "total_tokens": 7,
                                   "completion_tokens": 4}
    assert chunks[-1].usage == Usage(3, 4)  # the tenant's: its prompt once, 4 tokens once
    assert chunks[-1].data.endswith(b"data: [DONE]\n\n")
    resume = backend.requests[1]
    body = json.loads(resume.body)
    assert resume.path == "/v1/completions" and resume.resume_prompt_tokens == 3
    assert body["prompt"] == [1, 2, 3, 10, 11] and body["max_tokens"] == 2
    assert (body["temperature"], body["seed"]) == (0, 5)
    assert mig.migrated["m"] == 1 and mig.seen == [("m", 5)] and mig.reasons == ["failure"]


async def test_a_stream_moved_off_a_draining_replica_resumes_and_counts_as_drain():
    backend = Scripted(death=ReplicaDrainingError("the model replica is draining"))
    mig = migrator(backend, attempts=2)
    chunks, events = await collect(mig, request())
    assert "".join(c["delta"].get("content") or "" for e in events for c in e["choices"]) \
        == "abcd"
    assert chunks[-1].usage == Usage(3, 4)
    assert mig.reasons == ["drain"]
    # The backend may move the first stream and the first resumption (one attempt left each
    # time), each after the configured delay.
    after = fake_config().gateway.migration.drain_after_s
    assert [r.drain_after_s for r in backend.requests] == [after, after]


async def test_the_last_allowed_resumption_is_never_moved_off_a_draining_replica():
    backend = Scripted(death=ReplicaDrainingError("the model replica is draining"))
    await collect(migrator(backend, attempts=1), request())
    assert backend.requests[0].drain_after_s is not None
    assert backend.requests[1].drain_after_s is None  # a move would fail it: it drains in place


async def test_a_replica_that_stops_answering_mid_stream_counts_as_failed_and_is_resumed():
    backend = Scripted(stall_s=3600)  # hangs after 'b' (it would die an hour later)
    mig = migrator(backend, stall_timeout_s=0.2)
    chunks, events = await asyncio.wait_for(collect(mig, request()), 10)
    assert "".join(c["delta"].get("content") or "" for e in events for c in e["choices"]) \
        == "abcd"
    assert chunks[-1].usage == Usage(3, 4) and mig.reasons == ["failure"]


async def test_a_stream_that_had_its_finish_gets_only_its_end():
    backend = Scripted(finish_before_death=True)
    chunks, events = await collect(migrator(backend), request())
    assert len(backend.requests) == 1
    assert events[-1]["usage"]["completion_tokens"] == 2
    assert chunks[-1].data.endswith(b"data: [DONE]\n\n")


async def test_gives_up_after_max_attempts_with_the_replicas_error():
    backend = Scripted(resume_fails=5)
    mig = migrator(backend, attempts=2)
    with pytest.raises(EngineUnavailableError, match="RayActorError"):
        await collect(mig, request())
    assert len(backend.requests) == 3 and mig.migrated["m"] == 0


async def test_a_resume_that_fails_once_is_tried_again_within_the_bound():
    backend = Scripted(resume_fails=1)
    _, events = await collect(migrator(backend, attempts=2), request())
    assert "".join(c["delta"].get("content") or "" for e in events for c in e["choices"]) \
        == "abcd"


async def test_migration_off_leaves_the_failure_as_it_was():
    backend = Scripted()
    with pytest.raises(EngineUnavailableError):
        await collect(migrator(backend, attempts=0), request())
    assert len(backend.requests) == 1


@pytest.mark.parametrize("body", [{"n": 2}, {"logprobs": True}, {"stop": ["x"]},
                                  {"tools": [{"type": "function"}]}, {"stream": False},
                                  {"response_format": {"type": "json_object"}},
                                  {"stream_options": {"continuous_usage_stats": True}}])
def test_requests_that_cannot_resume_exactly_are_not_resumable(body):
    base = {"model": "m", "messages": [], "stream": True}
    assert resumable(CHAT, base)
    assert not resumable(CHAT, {**base, **body})


def test_completions_with_a_list_of_prompts_are_not_resumable():
    base = {"model": "m", "stream": True}
    assert resumable("/v1/completions", {**base, "prompt": "hi"})
    assert resumable("/v1/completions", {**base, "prompt": [1, 2]})
    assert not resumable("/v1/completions", {**base, "prompt": ["a", "b"]})
    assert not resumable(CHAT, {**base, "messages": []}, reasoning_parser=True)


class DiesTwice(Scripted):
    """The first resumption dies too after 'c'; the second finishes."""

    def __init__(self):
        super().__init__()
        self.resumes = 0

    async def serve(self, model, request):
        if request.path == CHAT:
            async for c in super().serve(model, request):
                yield c
            return
        self.resumes += 1
        if self.resumes == 1:
            yield EngineChunk(sse(completion_event("c", [12])), Usage(5, 1), 200,
                              "text/event-stream", token_ids=(12,),
                              prompt_token_ids=(1, 2, 3, 10, 11))
            raise EngineUnavailableError("the model replica failed: RayActorError")
        body = json.loads(request.body)
        assert body["prompt"] == [1, 2, 3, 10, 11, 12] and body["max_tokens"] == 1
        yield EngineChunk(sse(completion_event("d", [13], "length"),
                              {"id": "x", "choices": [], "usage": {"prompt_tokens": 6,
                                                                   "completion_tokens": 1,
                                                                   "total_tokens": 7}},
                              b"[DONE]"), Usage(6, 1), 200, "text/event-stream",
                          token_ids=(13,), prompt_token_ids=(1, 2, 3, 10, 11, 12))


async def test_a_resumed_stream_that_dies_is_resumed_again_from_where_it_was():
    backend = DiesTwice()
    mig = migrator(backend, attempts=2)
    chunks, events = await collect(mig, request())
    assert "".join(c["delta"].get("content") or "" for e in events for c in e["choices"]) \
        == "abcd"
    assert events[-1]["usage"]["completion_tokens"] == 4 and chunks[-1].usage == Usage(3, 4)
    assert mig.migrated["m"] == 2 and mig.seen == [("m", 5), ("m", 6)]


async def test_replica_moves_token_ids_out_of_the_events_and_restores_the_clients_nulls():
    from moestack.engine.resume import annotate, with_token_ids

    req, ok, keep = with_token_ids(request())
    assert ok and not keep and json.loads(req.body)["return_token_ids"] is True
    first = (b'data: {"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":""}}'
             b'],"prompt_token_ids":[1,2,3]}\n\n')
    later = (b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"\\"token_ids\\":[9]"},'
             b'"token_ids":[10,11]}]}\n\n')

    async def engine():
        yield EngineChunk(first, Usage(3, 0), 200, "text/event-stream")
        yield EngineChunk(later, Usage(3, 2))

    out = [c async for c in annotate(engine(), keep_ids=False)]
    assert out[0].prompt_token_ids == (1, 2, 3) and out[0].token_ids == ()
    assert b'"prompt_token_ids":null' in out[0].data
    assert out[1].token_ids == (10, 11) and out[1].prompt_token_ids is None
    assert json.loads(out[1].data[6:])["choices"][0] == {
        "index": 0, "delta": {"content": '"token_ids":[9]'}, "token_ids": None}


def test_replay_gives_the_text_the_unbroken_stream_would_have_sent_across_split_characters():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

    from moestack.engine.resume import Replay

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["héllo wörld ünïcode"] * 5, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    prompt = tok.encode("héllo").ids
    # Byte tokens that split 'ö' and 'ü' across tokens.
    ids = [tok.token_to_id(b) for b in ("Ġ", "w", "Ã", "¶", "r", "Ġ", "Ã", "¼")]
    from tokenizers.decoders import DecodeStream

    whole = DecodeStream(ids=prompt, skip_special_tokens=True)
    unbroken = "".join(whole.step(tok, t) or "" for t in ids)
    assert unbroken == " wör ü"
    naive_ok = []
    for k in range(len(ids)):
        head = DecodeStream(ids=prompt, skip_special_tokens=True)
        sent = "".join(head.step(tok, t) or "" for t in ids[:k])
        assert sent + Replay(tok, prompt, ids[:k]).text(ids[k:]) == unbroken
        # What the resuming engine's own detokenizer gives (primed with the resumed prompt).
        naive = DecodeStream(ids=prompt + ids[:k], skip_special_tokens=True)
        naive_ok.append(sent + "".join(naive.step(tok, t) or "" for t in ids[k:]) == unbroken)
    assert not all(naive_ok)  # a seam inside a character repeats or loses text without Replay
