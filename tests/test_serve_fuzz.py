"""Property-based tests of what clients send: schemathesis generates valid and invalid requests from the served
OpenAPI document (a bounded number per operation) against a live server with the tiny random 2.x checkpoint, and
hypothesis drives the validators with any Unicode and numbers at and past every limit. No answer may be a 5xx;
every 4xx is OpenAI's error shape naming what was wrong."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.serve_support import ServerThread, make_settings, wait_models_loaded  # noqa: E402

EXAMPLES = 30


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from qimg.serve.settings import Limits

    # small budgets keep the generated jobs short: at most a few tiny steps, each stopped after 3 s
    limits = Limits(max_job_cost=2.0, max_image_bytes=256 * 1024, max_n=2)
    settings = make_settings(tmp_path_factory.mktemp("fuzz"), max_queue=4, limits=limits, job_timeout=3)
    with ServerThread(settings) as srv:
        wait_models_loaded(srv.url)
        yield srv


@pytest.fixture(scope="module")
def api_schema(live):
    return schemathesis.openapi.from_url(live.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


def check_answer(response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if 400 <= response.status_code < 500 and response.request.method != "HEAD":
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_request_gets_a_server_error(case):
    check_answer(case.call(timeout=60))

# -- the validators, directly --------------------------------------------------------------------------------------
@given(st.text(max_size=200) | st.text(alphabet=st.characters(codec=None, min_codepoint=0xD800, max_codepoint=0xDFFF),
                                       max_size=5))
@settings(max_examples=300, deadline=None)
def test_any_prompt_is_accepted_or_refused_by_name(text):
    from qimg.serve.errors import ApiError
    from qimg.serve.requests import check_text
    from qimg.serve.settings import Limits
    from qimg.serve.uploads import check_prompt

    try:
        check_text({"prompt": text})
        checked = check_prompt(text, Limits())
    except ApiError as err:
        assert err.status == 400 and err.param == "prompt", err.message
        return
    assert checked == text and text.strip()
    checked.encode("utf-8")  # what is accepted can be stored and tokenized


@given(st.text(max_size=30))
@settings(max_examples=300, deadline=None)
def test_any_size_text_parses_or_is_refused(text):
    from qimg.serve.errors import ApiError
    from qimg.serve.uploads import parse_size

    try:
        width, height = parse_size(text)
    except ApiError as err:
        assert err.status == 400 and err.param == "size" and repr(text) in err.message
        return
    assert (width, height) == (None, None) or (width >= 1 and height >= 1)


NUMBERS = st.one_of(st.integers(min_value=-2**70, max_value=2**70), st.floats(allow_nan=True, allow_infinity=True),
                    st.booleans(), st.none(), st.text(max_size=5))


@given(steps=NUMBERS, seed=NUMBERS, cfg=NUMBERS, n=NUMBERS, width=NUMBERS, shift=NUMBERS, resolution=NUMBERS)
@settings(max_examples=400, deadline=None)
def test_any_numbers_make_options_or_name_the_field(**fields):
    """The library's options take a value or refuse it with an InputError naming the field; never another error."""
    from qimg.errors import InputError
    from qimg.options import GenerateOptions

    try:
        GenerateOptions(prompt="x", **fields)
    except InputError as err:
        assert any(name in str(err) for name in fields), str(err)


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children,
                                                                                      max_size=4), max_leaves=40))
@settings(max_examples=300, deadline=None)
def test_any_json_body_is_a_400_or_a_request(body):
    from qimg.serve.errors import ApiError
    from qimg.serve.requests import GenerationRequest, validate

    data = body if isinstance(body, dict) else {"prompt": "x", "extra": body}
    try:
        req = validate(GenerationRequest, json.loads(json.dumps(data)), strict=True)
    except ApiError as err:
        assert err.status == 400 and err.message
        return
    assert isinstance(req.prompt, str)
