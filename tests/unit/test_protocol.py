import json

import pytest

from serve.adapters import parse_body
from serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest

MSG = [{"role": "user", "content": "hi"}]


def api_error(raw, cls=ChatCompletionRequest) -> ApiError:
    with pytest.raises(ApiError) as ei:
        parse_body(raw if isinstance(raw, bytes) else json.dumps(raw).encode(), cls)
    return ei.value


class TestErrorShape:
    def test_body_has_openai_fields(self):
        e = ApiError(404, "nope", type_="not_found_error", param="model", code="model_not_found")
        assert e.body() == {
            "error": {"message": "nope", "type": "not_found_error", "param": "model", "code": "model_not_found"}
        }

    def test_retry_after_header(self):
        assert ApiError(503, "busy", retry_after_s=2.4).headers() == {"Retry-After": "2"}
        assert ApiError(503, "busy", retry_after_s=0.1).headers() == {"Retry-After": "1"}
        assert ApiError(400, "bad").headers() == {}


class TestChatValidation:
    @pytest.mark.parametrize(
        "raw, param, code",
        [
            (b"{not json", None, "invalid_json"),
            (b"[1, 2]", None, "invalid_json"),
            ({"model": "m"}, "messages", "missing_required_parameter"),
            ({"model": "m", "messages": []}, "messages", "invalid_value"),
            ({"model": "m", "messages": MSG, "max_tokens": -5}, "max_tokens", "invalid_value"),
            ({"model": "m", "messages": MSG, "max_tokens": "ten"}, "max_tokens", "invalid_value"),
            ({"model": "m", "messages": MSG, "temperature": 3}, "temperature", "invalid_value"),
            ({"model": "m", "messages": MSG, "top_p": 0}, "top_p", "invalid_value"),
            ({"model": "m", "messages": MSG, "n": 2}, "n", "invalid_value"),
            ({"model": "m", "messages": MSG, "stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
            ({"model": "m", "messages": MSG, "tools": []}, "tools", "unsupported_parameter"),
            ({"model": "m", "messages": MSG, "logprobs": True}, "logprobs", "invalid_value"),
            ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role", "invalid_value"),
            ({"model": 5, "messages": MSG}, "model", "invalid_value"),
        ],
    )
    def test_bad_input_is_400_naming_param(self, raw, param, code):
        e = api_error(raw)
        assert e.status_code == 400 and e.type == "invalid_request_error"
        assert e.code == code
        assert e.param == param
        assert e.message

    def test_valid_request(self):
        req = parse_body(
            json.dumps(
                {
                    "model": "m",
                    "messages": MSG,
                    "stop": "x",
                    "seed": 3,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
            ).encode(),
            ChatCompletionRequest,
        )
        assert req.stop_list() == ("x",) and req.seed == 3 and req.stream_options.include_usage

    def test_text_parts(self):
        req = ChatCompletionRequest.model_validate(
            {
                "model": "m",
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
                ],
            }
        )
        assert req.messages[0].text() == "ab"


class TestCompletionValidation:
    @pytest.mark.parametrize(
        "raw, param",
        [
            ({"model": "m"}, "prompt"),
            ({"model": "m", "prompt": ""}, "prompt"),
            ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
            ({"model": "m", "prompt": "x", "echo": True}, "echo"),
            ({"model": "m", "prompt": "x", "best_of": 2}, "best_of"),
        ],
    )
    def test_bad_input(self, raw, param):
        e = api_error(raw, CompletionRequest)
        assert e.status_code == 400 and e.param == param

    def test_default_max_tokens_is_16(self):
        assert CompletionRequest.model_validate({"model": "m", "prompt": "x"}).requested_max_tokens() == 16
