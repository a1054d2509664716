"""Recognising the last event of a streamed answer (a client closing after it is not a 499)."""

import pytest

from moestack.api.endpoints import ends_stream

CHAT_TAIL = (b'data: {"id":"c","choices":[{"delta":{},"finish_reason":"length"}]}\n\n'
             b"data: [DONE]\n\n")
MESSAGES_TAIL = (b'event: message_delta\ndata: {"type":"message_delta"}\n\n'
                 b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
RESPONSES_TAIL = b'event: response.completed\ndata: {"response":{"status":"completed"}}\n\n'


@pytest.mark.parametrize("tail", [CHAT_TAIL, MESSAGES_TAIL, RESPONSES_TAIL, b"data: [DONE]\n\n",
                                  b'event: response.incomplete\ndata: {}\n\n'])
def test_the_last_event_ends_the_stream(tail):
    assert ends_stream(tail)


@pytest.mark.parametrize("tail", [
    b'data: {"id":"c","choices":[{"delta":{"content":"[DONE]"}}]}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta"}\n\n',
    b'event: response.output_text.delta\ndata: {"delta":"event: response.completed"}\n\n',
    b"", b"data: [DON"])
def test_a_stream_cut_before_its_last_event_did_not_end(tail):
    assert not ends_stream(tail)
