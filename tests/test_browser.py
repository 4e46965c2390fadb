"""The chat page in a real browser: Debian's Chromium, headless and offline, driving the project
under a real uvicorn process with the fake upstream behind it.

Playwright's async API is used directly: pytest-playwright's fixtures are synchronous (they keep
an event loop running that breaks every asyncio test after them) and its asyncio edition needs a
session-wide event loop, which this suite does not use.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import re
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async

from chatproxy.feedback import Rating
from chatproxy.models import Budget, Conversation, Message, Period, Scope, Spend
from tests.conftest import CHROMIUM_ARGS, CSRF_TOKEN, session_cookie, shared_database_name
from tests.fake_upstream import Reply
from tests.server import ServerProcess

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(
        "needs Debian's Chromium at /usr/bin/chromium: apt-get install chromium (.ci/run does)",
        allow_module_level=True,
    )

from playwright.async_api import Browser, Page, async_playwright, expect  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.server, pytest.mark.django_db(transaction=True)]

SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "screenshot.png"
# Installed before the page's own scripts: a snapshot of the last answer after every batch of
# DOM changes, so a test can tell an answer that grew from one that appeared whole.
RECORD_RENDERS = """
window.__renders = [];
new MutationObserver(() => {
  const answer = [...document.querySelectorAll(".chatproxy-message--assistant")].pop();
  if (answer) window.__renders.push({
    text: answer.querySelector(".chatproxy-message__content").textContent,
    status: answer.dataset.status,
  });
}).observe(document, {childList: true, subtree: true, characterData: true, attributes: true});
"""
TRANSPORTS = ["http", "websocket"]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield browser
        await browser.close()


@contextlib.asynccontextmanager
async def open_page(browser: Browser, server: Any, user: Any) -> AsyncIterator[Page]:
    """The chat page, logged in as ``user``; fails the test on a script error, on any request
    that leaves the test server, or on a traceback or warning in the server's log."""
    logged = len(server.output)
    context = await browser.new_context(
        base_url=server.url, viewport={"width": 1000, "height": 700}, color_scheme="light"
    )
    session = (await session_cookie(user)).split(";")[0].split("=", 1)[1]
    await context.add_cookies(
        [
            {"name": "sessionid", "value": session, "url": server.url},
            {"name": "csrftoken", "value": CSRF_TOKEN, "url": server.url},
        ]
    )
    errors: list[Any] = []
    foreign: list[str] = []

    def check_request(request: Any) -> None:
        if request.url.startswith(("http:", "https:")) and not request.url.startswith(server.url):
            foreign.append(request.url)

    context.on("weberror", lambda error: errors.append(error.error))
    context.on("request", check_request)
    page = await context.new_page()
    await page.add_init_script(RECORD_RENDERS)
    await page.goto("/")
    yield page
    await context.close()
    assert errors == []
    assert foreign == []
    assert not [line for line in server.output[logged:] if re.search("Traceback|Warning", line)]


@pytest.fixture
async def page(browser: Browser, server: Any, user: Any) -> AsyncIterator[Page]:
    async with open_page(browser, server, user) as page:
        yield page


async def use_transport(page: Page, transport: str) -> None:
    await page.get_by_label(
        "WebSocket" if transport == "websocket" else "HTTP stream", exact=True
    ).check()


async def send(page: Page, text: str) -> Any:
    """Type ``text``, press Enter, and return the locator of the answer it starts."""
    count = await page.locator(".chatproxy-message--assistant").count()
    await page.get_by_label("Message", exact=True).fill(text)
    await page.get_by_label("Message", exact=True).press("Enter")
    return page.locator(".chatproxy-message--assistant").nth(count)


async def saved_answer(upstream: Any, message_id: str) -> Message:
    """The answer's row once its turn has ended. The server saves it right after it closes the
    upstream request, in its own process: wait for that, then give the save a bounded while."""
    assert await upstream.requests[-1].wait_closed_by_client(), "the upstream was never closed"
    for _ in range(100):
        answer = await Message.objects.aget(pk=message_id)
        if answer.status != "streaming":
            return answer
        await asyncio.sleep(0.05)
    raise AssertionError(f"answer {message_id} was still streaming 5 seconds after the Stop")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_answer_grows_on_the_page_as_it_streams(page, upstream, transport):
    upstream.enqueue(
        Reply(tokens=["The ", "answer ", "grows ", "word ", "by ", "word."], delay=0.1)
    )
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    await use_transport(page, transport)

    answer = await send(page, "Hi")

    await expect(answer).to_have_attribute("data-status", "completed")
    await expect(answer.locator(".chatproxy-message__content")).to_have_text(
        "The answer grows word by word."
    )
    renders = await page.evaluate("window.__renders")
    partial = {r["text"] for r in renders if r["status"] == "streaming" and r["text"]}
    assert len(partial) >= 2, renders
    assert len(sockets) == (1 if transport == "websocket" else 0)
    await expect(page.get_by_label("Message", exact=True)).to_be_focused()
    await expect(page.get_by_role("button", name="Stop")).to_be_disabled()
    await expect(page.get_by_role("button", name=re.compile("^Hi"))).to_be_visible()


@pytest.mark.parametrize(("transport", "code"), [("http", "cancelled"), ("websocket", "cancelled")])
async def test_stop_ends_the_answer_and_it_is_saved_interrupted(page, upstream, transport, code):
    upstream.enqueue(Reply(tokens=[f"word{i} " for i in range(300)], delay=0.02))
    await use_transport(page, transport)

    answer = await send(page, "Tell me a long story")
    await expect(answer.locator(".chatproxy-message__content")).to_contain_text("word3")
    await page.get_by_role("button", name="Stop").click()

    await expect(answer).to_have_attribute("data-status", "interrupted")
    await expect(answer).to_contain_text("Stopped.")
    row = await saved_answer(upstream, await answer.get_attribute("data-message-id"))
    assert (row.status, row.error_code) == ("interrupted", code)
    assert row.content.startswith("word0 word1 word2 word3 ")
    assert "word299" not in row.content
    await expect(page.get_by_role("button", name="Send")).to_be_enabled()


# Installed before the page's scripts: notes, one task after the page has read the JSON body of a
# response marked ``X-Held`` (so once whatever the page does with it has run), that it did.
RECORD_HELD_READ = """
window.__heldRead = false;
const readJson = Response.prototype.json;
Response.prototype.json = function () {
  return readJson.call(this).then((body) => {
    if (this.headers.get("x-held")) setTimeout(() => { window.__heldRead = true; });
    return body;
  });
};
"""


async def test_a_slow_transcript_does_not_erase_a_newer_turn(page, upstream):
    upstream.enqueue(Reply(tokens=["Par", "is."]), Reply(tokens=["About ", "two ", "million."]))
    first = await send(page, "Capital of France?")
    await expect(first.get_by_role("button", name="Regenerate")).to_be_visible()  # all fetched
    await page.add_init_script(RECORD_HELD_READ)
    release = asyncio.Event()
    transcripts = 0

    async def hold_the_first_transcript(route: Any) -> None:
        nonlocal transcripts
        transcripts += 1
        if transcripts > 1:
            return await route.continue_()
        response = await route.fetch()  # the transcript as it is now, delivered late
        body = await response.body()
        await release.wait()
        headers = {**response.headers, "x-held": "1"}
        await route.fulfill(response=response, body=body, headers=headers)

    await page.route(re.compile(r"/conversations/[0-9a-f-]{36}$"), hold_the_first_transcript)
    await page.reload()  # opens ?c=<id> again: that transcript is the held one
    await page.get_by_role("button", name=re.compile("^Capital of France")).click()
    await expect(page.locator(".chatproxy-message")).to_have_count(2)
    follow_up = await send(page, "How many people live there?")
    await expect(follow_up).to_have_attribute("data-status", "completed")

    release.set()
    await page.wait_for_function("window.__heldRead")
    await expect(page.locator(".chatproxy-message")).to_have_text(
        [re.compile("Capital"), re.compile("Paris."), re.compile("How many"), re.compile("million")]
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_reload_and_continue_a_conversation(page, upstream, transport):
    upstream.enqueue(Reply(tokens=["Par", "is."]), Reply(tokens=["About ", "two ", "million."]))
    await use_transport(page, transport)
    first = await send(page, "Capital of France?")
    await expect(first).to_have_attribute("data-status", "completed")

    await page.reload()
    await page.get_by_role("button", name=re.compile("^Capital of France")).click()
    await expect(page.locator(".chatproxy-message")).to_have_text(
        [re.compile("Capital of France"), re.compile("Paris.")]
    )
    await expect(page.get_by_label("WebSocket", exact=True)).to_be_checked(
        checked=transport == "websocket"
    )
    follow_up = await send(page, "How many people live there?")

    await expect(follow_up).to_have_attribute("data-status", "completed")
    await expect(follow_up).to_contain_text("About two million.")
    sent = upstream.requests[-1].json["messages"]
    assert [(m["role"], m["content"]) for m in sent if m["role"] != "system"] == [
        ("user", "Capital of France?"),
        ("assistant", "Paris."),
        ("user", "How many people live there?"),
    ]
    assert await Conversation.objects.acount() == 1


async def test_escape_stops_the_answer(page, upstream):
    upstream.enqueue(Reply(tokens=[f"word{i} " for i in range(300)], delay=0.02))

    answer = await send(page, "Tell me a long story")
    await expect(answer.locator(".chatproxy-message__content")).to_contain_text("word3")
    await page.keyboard.press("Escape")

    await expect(answer).to_have_attribute("data-status", "interrupted")
    assert await upstream.requests[-1].wait_closed_by_client()


async def test_an_error_in_the_stream_is_shown_plainly(page, upstream):
    upstream.enqueue(Reply(status=429))

    answer = await send(page, "Hi")

    await expect(answer).to_have_attribute("data-status", "failed")
    alert = page.get_by_role("alert")
    await expect(alert).to_have_text(
        "The model's server is rate-limiting requests. Wait a moment and try again. "
        "upstream_rate_limited"
    )


async def test_a_refused_request_is_shown_and_its_text_kept_to_retry(page, upstream):
    first = await send(page, "Hi")
    await expect(first).to_have_attribute("data-status", "completed")
    await Conversation.objects.all().adelete()  # e.g. deleted from another tab

    await send(page, "Still there?")

    await expect(page.get_by_role("alert")).to_contain_text(
        "No conversation with that id belongs to you."
    )
    await expect(page.get_by_label("Message", exact=True)).to_have_value("Still there?")


# Every read size from one byte (each line, and the two-byte é and three-byte ✓, cut apart) to
# the whole body (every line in one read): the events must come out the same each time.
SPLIT_READS = """
async () => {
  const { streamChat } = await import("/static/chatproxy/client.js");
  const body = new TextEncoder().encode([
    {event: "analyzing", conversation_id: "c", message_id: "m", model: "gpt-test"},
    {event: "answering", content: "Hé"},
    {event: "answering", content: "llo ✓"},
    {event: "answering", content: "!"},
    {event: "completed", conversation_id: "c", message_id: "m", finish_reason: "stop"},
  ].map((event) => JSON.stringify(event) + "\\n").join(""));
  const results = new Set();
  for (let size = 1; size <= body.length; size++) {
    const stream = new ReadableStream({
      start(controller) {
        for (let i = 0; i < body.length; i += size) controller.enqueue(body.slice(i, i + size));
        controller.close();
      },
    });
    const fetch = async () => new Response(stream, {status: 200});
    const seen = [];
    const onEvent = (e) => seen.push(e.event === "answering" ? e.content : e.event);
    const end = await streamChat({messages: [], fetch, onEvent});
    results.add(JSON.stringify([...seen, end.event]));
  }
  return [...results];
}
"""


async def test_client_parses_lines_split_across_reads_and_many_lines_in_one_read(page):
    results = await page.evaluate(SPLIT_READS)

    assert results == ['["analyzing","Hé","llo ✓","!","completed","completed"]']


MARKDOWN = {
    "a **b** *c* `d`": "<p>a <strong>b</strong> <em>c</em> <code>d</code></p>",
    "one\ntwo\n\nthree": "<p>one<br>two</p><p>three</p>",
    "- x\n- y\n  more": "<ul><li>x</li><li>y<br>more</li></ul>",
    "3. x\n4. y": '<ol start="3"><li>x</li><li>y</li></ol>',
    "## Heading": "<h4>Heading</h4>",
    "```py\n<b>x</b>\n```": '<pre><code data-language="py">&lt;b&gt;x&lt;/b&gt;</code></pre>',
    "```\nstill streaming": "<pre><code>still streaming</code></pre>",
    "snake_case_name and _em_": "<p>snake_case_name and <em>em</em></p>",
    "[ok](https://example.com/?a=1)": (
        '<p><a href="https://example.com/?a=1" rel="noopener noreferrer" target="_blank">ok</a></p>'
    ),
    "[x](javascript:void(0)) [y](data:text/html,hi) [z](/admin/)": (
        "<p>[x](javascript:void(0)) [y](data:text/html,hi) [z](/admin/)</p>"
    ),
}


async def test_markdown_renders_its_subset_and_nothing_else(page):
    rendered = await page.evaluate(
        """async (sources) => {
            const { renderMarkdown } = await import("/static/chatproxy/chat.js");
            return sources.map((source) => {
                const box = document.createElement("div");
                box.append(renderMarkdown(source));
                return box.innerHTML;
            });
        }""",
        list(MARKDOWN),
    )

    assert dict(zip(MARKDOWN, rendered, strict=True)) == MARKDOWN


MALICIOUS = [
    'Look: <img src=x onerror="window.__xss=1">',
    " and <scr",
    "ipt>window.__xss=1</script>",
    "\n\n[click me](javascript:window.__xss=1) **bold**",
]


async def assert_inert(page: Page) -> None:
    content = page.locator(".chatproxy-message--assistant .chatproxy-message__content")
    await expect(content).to_contain_text(
        'Look: <img src=x onerror="window.__xss=1"> and <script>window.__xss=1</script>'
    )
    await expect(content).to_contain_text("[click me](javascript:window.__xss=1)")
    await expect(content.locator("strong")).to_have_text("bold")
    await expect(content.locator("img, script, a")).to_have_count(0)
    await expect(page.locator(".chatproxy-message--user .chatproxy-message__content")).to_have_text(
        "Show me <b>markup</b>"
    )
    assert await page.evaluate("window.__xss") is None


async def test_markup_from_the_model_stays_inert_text(page, upstream):
    upstream.enqueue(Reply(tokens=MALICIOUS, delay=0.05))

    answer = await send(page, "Show me <b>markup</b>")
    await expect(answer).to_have_attribute("data-status", "completed")
    await assert_inert(page)

    await page.reload()  # the stored transcript goes through the same renderer
    await page.get_by_role("button", name="Show me <b>markup</b>").click()
    await assert_inert(page)


async def test_screenshot_of_a_finished_exchange(page, upstream, user):
    for title in ("Plan a three-day trip to Lisbon", "Explain asyncio.TaskGroup"):
        await Conversation.objects.acreate(
            owner=user, title=title, model="gpt-test", status="completed"
        )
    answer_text = (
        "Serve the project under an **ASGI** server and POST to `/completions`:\n\n"
        "- each line is one JSON event,\n"
        "- `answering` events carry the text as it arrives,\n"
        "- the stream ends with `completed` or `error`.\n\n"
        "```js\nawait streamChat({ messages, onEvent });\n```\n"
        "See the [README](https://github.com/) for the WebSocket variant."
    )
    upstream.enqueue(
        Reply(tokens=[answer_text[i : i + 12] for i in range(0, len(answer_text), 12)])
    )
    await page.reload()  # show the conversations made above

    answer = await send(page, "How do I stream a chat answer into a Django page?")
    await expect(answer).to_have_attribute("data-status", "completed")
    await expect(answer.locator("a")).to_have_attribute("rel", "noopener noreferrer")
    await expect(page.locator(".chatproxy-conversation")).to_have_count(3)

    SCREENSHOT.parent.mkdir(exist_ok=True)
    await page.screenshot(path=str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 10_000


@pytest.fixture
async def anonymous_page(browser: Browser, django_db_blocker: Any, upstream: Any) -> Any:
    """The chat page of a server with anonymous chat on, for a visitor with no cookies."""
    from tests.conftest import shared_database_name

    settings = {"CHATPROXY_ALLOW_ANONYMOUS": True}
    server = ServerProcess(shared_database_name(django_db_blocker), upstream.base_url, settings)
    await asyncio.to_thread(server.start)
    context = await browser.new_context(base_url=server.url)
    errors: list[Any] = []
    context.on("weberror", lambda error: errors.append(error.error))
    page = await context.new_page()
    await page.goto("/")
    yield page
    await context.close()
    await asyncio.to_thread(server.stop)
    assert errors == []
    assert not [line for line in server.output if re.search("Traceback|Warning", line)]


async def test_an_anonymous_visitor_chats_with_a_session_from_their_first_turn(
    anonymous_page, upstream
):
    from django.contrib.sessions.models import Session

    page = anonymous_page
    assert await Session.objects.acount() == 0  # the page view made none

    first = await send(page, "Hi")
    await expect(first).to_have_attribute("data-status", "completed")
    # Now the visitor has a session cookie, so the page's requests must carry the CSRF token.
    second = await send(page, "Again")
    await expect(second).to_have_attribute("data-status", "completed")

    assert await Session.objects.acount() == 1
    conversation = await Conversation.objects.aget()
    assert conversation.owner_id is None and conversation.session_key
    assert [
        m async for m in Message.objects.filter(role="user").values_list("content", flat=True)
    ] == ["Hi", "Again"]
    await expect(page.locator(".chatproxy-conversation")).to_have_count(1)


@pytest.fixture(scope="module")
def scripted_server(django_db_setup: Any, django_db_blocker: Any, upstream_server: Any) -> Any:
    """A server whose turns also emit reasoning and a tool call (tests.conftest.ScriptedEvents)."""
    interceptors = ["chatproxy.interceptors.SystemPrompt", "tests.conftest.ScriptedEvents"]
    process = ServerProcess(
        shared_database_name(django_db_blocker),
        upstream_server.base_url,
        {"CHATPROXY_INTERCEPTORS": interceptors},
    )
    process.start()
    yield process
    process.stop()


@pytest.fixture
async def scripted_page(browser: Browser, scripted_server: Any, user: Any) -> AsyncIterator[Page]:
    async with open_page(browser, scripted_server, user) as page:
        yield page


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_reasoning_streams_folded_and_a_tool_call_shows_as_a_card(
    scripted_page, upstream, transport
):
    page = scripted_page
    upstream.enqueue(Reply(tokens=["It ", "is ", "noon", "."], delay=0.15))
    await use_transport(page, transport)

    answer = await send(page, "What time is it?")
    reasoning = answer.locator("details.chatproxy-reasoning")
    await expect(reasoning).to_have_js_property("open", False)  # folded while it streams
    await expect(reasoning.locator("summary")).to_have_text("Reasoning…")
    await expect(answer).to_have_attribute("data-status", "streaming")
    await reasoning.locator("summary").click()
    await expect(reasoning.locator(".chatproxy-reasoning__text")).to_have_text(
        "Thinking about the clock."
    )
    await expect(answer).to_have_attribute("data-status", "completed")
    await expect(reasoning.locator("summary")).to_have_text("Reasoning")
    await expect(answer.locator(".chatproxy-message__content")).to_have_text("It is noon.")
    card = answer.locator(".chatproxy-tool-call")
    await expect(card).to_have_attribute("data-call-id", "call_1")
    await expect(card.locator(".chatproxy-tool-call__head")).to_have_text(
        "Tool call get_time call_1"
    )
    assert await card.locator("pre").text_content() == '{\n  "zone": "UTC"\n}'
    tools = upstream.requests[-1].json["tools"]
    assert [t["function"]["name"] for t in tools] == ["get_time"]  # the page's own tool


PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_attached_image_is_sent_as_parts_and_shown_again_on_reopening(
    page, upstream, transport
):
    upstream.enqueue(Reply(tokens=["A ", "picture."]))
    await use_transport(page, transport)
    await page.locator("#chatproxy-image").set_input_files(
        {"name": "dot.png", "mimeType": "image/png", "buffer": PNG}
    )
    await expect(page.get_by_role("button", name="Remove image 1")).to_be_visible()

    answer = await send(page, "What is this?")
    await expect(answer).to_have_attribute("data-status", "completed")

    data_url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    content = upstream.requests[-1].json["messages"][-1]["content"]
    assert content == [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": data_url}},
    ]
    await expect(page.locator("#chatproxy-attachments li")).to_have_count(0)
    image = page.locator(".chatproxy-message--user img")
    await expect(image).to_have_attribute("src", data_url)
    await page.reload()
    await page.get_by_role("button", name=re.compile("^What is this")).click()
    await expect(page.locator(".chatproxy-message--user img")).to_have_attribute("src", data_url)


async def test_a_pasted_image_is_attached(page, upstream):
    await page.get_by_label("Message", exact=True).focus()
    await page.evaluate(
        """(bytes) => {
            const file = new File([new Uint8Array(bytes)], "pasted.png", {type: "image/png"});
            const data = new DataTransfer();
            data.items.add(file);
            const paste = new ClipboardEvent("paste", {clipboardData: data, bubbles: true});
            document.getElementById("chatproxy-prompt").dispatchEvent(paste);
        }""",
        list(PNG),
    )

    await expect(page.locator("#chatproxy-attachments img")).to_have_count(1)


async def test_an_image_over_the_limit_is_refused_before_sending(page, upstream):
    big = PNG + b"\0" * 180_000
    await page.locator("#chatproxy-image").set_input_files(
        {"name": "big.png", "mimeType": "image/png", "buffer": big}
    )

    await expect(page.get_by_role("alert")).to_contain_text(
        "big.png is 175.9 KB, and only 175.8 KB more of images fit in this message: make it "
        "smaller, or send it in the next one."
    )
    await expect(page.locator("#chatproxy-attachments li")).to_have_count(0)
    assert upstream.requests == []


async def test_a_reopened_answer_that_called_a_tool_is_answered_by_the_page_tool(
    page, upstream, user
):
    conversation = await Conversation.objects.acreate(owner=user, title="What time is it?")
    call = {"id": "call_7", "name": "get_time", "arguments": "{}"}
    for position, fields in enumerate(
        [
            {"role": "user", "content": "What time is it?"},
            {"role": "assistant", "reasoning": "Ask the clock.", "tool_calls": [call]},
        ]
    ):
        await Message.objects.acreate(
            conversation=conversation, position=position, status="completed", **fields
        )
    upstream.enqueue(Reply(tokens=["Thanks."]))
    await page.reload()
    await page.get_by_role("button", name=re.compile("^What time is it")).click()
    called = page.locator(".chatproxy-message--assistant").first
    await expect(called.locator(".chatproxy-tool-call")).to_have_attribute("data-call-id", "call_7")
    await expect(called.locator("details.chatproxy-reasoning")).to_have_js_property("open", False)

    answer = await send(page, "And the date?")
    await expect(answer).to_have_attribute("data-status", "completed")

    sent = upstream.requests[-1].json["messages"]
    assert [m["role"] for m in sent if m["role"] != "system"] == [
        "user",
        "assistant",
        "tool",
        "user",
    ]
    result = next(m for m in sent if m["role"] == "tool")
    assert result["tool_call_id"] == "call_7" and '"time_zone"' in result["content"]
    await expect(page.locator(".chatproxy-message--tool")).to_have_count(1)


@pytest.fixture(scope="module")
def demo_server(django_db_setup: Any, django_db_blocker: Any, upstream_server: Any) -> Any:
    """A server with no API key: the offline demo model answers."""
    demo = {"CHATPROXY_API_KEY": "", "CHATPROXY_MODELS": ["chatproxy-demo"]}
    process = ServerProcess(
        shared_database_name(django_db_blocker),
        upstream_server.base_url,
        {**demo, "CHATPROXY_DEFAULT_MODEL": "chatproxy-demo"},
    )
    process.start()
    yield process
    process.stop()


async def test_the_demo_model_reasons_calls_the_page_tool_and_answers_with_its_result(
    browser, demo_server, user
):
    async with open_page(browser, demo_server, user) as page:
        called = await send(page, "What time is it?")

        await expect(called.locator("details.chatproxy-reasoning")).to_have_count(1, timeout=10_000)
        await expect(called.locator(".chatproxy-tool-call strong")).to_have_text("get_time")
        await expect(page.locator(".chatproxy-message--tool")).to_contain_text("time_zone")
        answer = page.locator(".chatproxy-message--assistant").nth(1)
        await expect(answer).to_have_attribute("data-status", "completed")
        await expect(answer.locator(".chatproxy-message__content")).to_contain_text(
            "The tool says:"
        )


@pytest.fixture
def tools_server(django_db_blocker: Any, upstream_server: Any) -> Iterator[ServerProcess]:
    process = ServerProcess(
        shared_database_name(django_db_blocker),
        upstream_server.base_url,
        {"CHATPROXY_TOOLS": ["tests.sample_tools.add", "tests.sample_tools.refund"]},
    )
    process.start()
    yield process
    process.stop()


@pytest.fixture
async def tools_page(browser: Browser, tools_server: Any, user: Any) -> AsyncIterator[Page]:
    async with open_page(browser, tools_server, user) as page:
        yield page


async def test_a_server_tools_result_shows_on_its_card_and_an_approval_is_asked_and_sent(
    tools_page, upstream
):
    page = tools_page
    upstream.enqueue(
        Reply(tokens=[], tool_calls=[{"id": "a", "name": "add", "arguments": '{"a": 1, "b": 1}'}]),
        Reply(tokens=[], tool_calls=[{"id": "r", "name": "refund", "arguments": '{"amount": 5}'}]),
        Reply(tokens=["Refunded."]),
    )
    answer = await send(page, "Refund me")

    await expect(
        answer.locator('[data-call-id="a"] .chatproxy-tool-call__result pre')
    ).to_have_text("2")
    await answer.get_by_role("button", name="Approve").click()
    approved = page.locator(".chatproxy-message--assistant").nth(1)
    await expect(approved.locator(".chatproxy-message__content")).to_have_text("Refunded.")
    await expect(
        approved.locator('[data-call-id="r"] .chatproxy-tool-call__result pre')
    ).to_have_text('"Refunded 5."')
    assert upstream.requests[-1].json["messages"][-1] == {
        "role": "tool",
        "tool_call_id": "r",
        "content": '"Refunded 5."',
    }


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_the_owner_rates_an_answer_comments_and_sees_it_on_reopening(
    page, upstream, transport
):
    await use_transport(page, transport)
    answer = await send(page, "Capital of France?")
    await expect(answer).to_have_attribute("data-status", "completed")
    message_id = await answer.get_attribute("data-message-id")

    await answer.get_by_role("button", name="Good answer").click()
    await expect(answer.get_by_role("button", name="Good answer")).to_have_attribute(
        "aria-pressed", "true"
    )
    await answer.get_by_role("button", name="Bad answer").click()
    await expect(answer.get_by_role("button", name="Bad answer")).to_have_attribute(
        "aria-pressed", "true"
    )
    await answer.get_by_label("Comment on this answer").fill("Too short.")
    async with page.expect_response(re.compile(r"/rating$")) as posted:
        await answer.get_by_role("button", name="Send").click()
    assert (await (await posted.value).json())["rating"]["comment"] == "Too short."

    rating = await Rating.objects.aget(message_id=message_id)
    assert (rating.value, rating.comment) == ("down", "Too short.")
    await page.reload()
    await page.get_by_role("button", name=re.compile("^Capital of France")).click()
    reopened = page.locator(".chatproxy-message--assistant").last
    await expect(reopened.get_by_role("button", name="Bad answer")).to_have_attribute(
        "aria-pressed", "true"
    )
    await expect(reopened.get_by_label("Comment on this answer")).to_have_value("Too short.")


# The admin as a reviewer's workspace, in real Chromium: the screenshots in docs/reviewing.md.

DOCS = Path(__file__).resolve().parent.parent / "docs"
# The screenshots docs/reviewing.md shows: the dashboard in both themes, the rest in light.
SHOTS = {("transcript", "light"), ("list", "light"), ("dashboard", "light"), ("dashboard", "dark")}


async def shoot(page: Page, name: str, scheme: str, **kwargs: Any) -> None:
    if (name, scheme) in SHOTS:
        await page.screenshot(path=str(DOCS / f"reviewing-{name}-{scheme}.png"), **kwargs)


@pytest.fixture
async def superuser(django_user_model: Any) -> Any:
    return await django_user_model.objects.acreate(
        username="carol", is_staff=True, is_superuser=True
    )


LISBON = '{"zone":"Europe/Lisbon"}'


async def reviewed_conversation(user: Any, reviewer: Any) -> Conversation:
    from chatproxy.review import Annotation

    conversation = await Conversation.objects.acreate(
        owner=user, title="What time is it in Lisbon?", model="gpt-4o-mini", status="completed"
    )
    rows = [
        {"role": "user", "content": "What time is it in Lisbon? My card is 4111 1111."},
        {
            "role": "assistant",
            "reasoning": "The user wants the local time: call the clock tool.",
            "tool_calls": [{"id": "call_1", "name": "get_time", "arguments": LISBON}],
            "status": "completed",
            "finish_reason": "tool_calls",
            "model": "gpt-4o-mini",
            "total_tokens": 88,
            "first_token_ms": 412,
            "duration_ms": 690,
            "cost": Decimal("0.000041"),
        },
        {"role": "tool", "content": "14:05", "tool_call_id": "call_1",
         "metadata": {"name": "get_time", "duration_ms": 3}},
        {
            "role": "assistant",
            "content": "It is 14:05 in Lisbon. Keep your card number [redacted] to yourself.",
            "raw_content": "It is 14:05 in Lisbon. Keep your card number 4111 1111 to yourself.",
            "status": "completed",
            "model": "gpt-4o-mini",
            "total_tokens": 131,
            "first_token_ms": 380,
            "duration_ms": 1210,
            "cost": Decimal("0.000063"),
        },
    ]  # fmt: skip
    for position, fields in enumerate(rows):
        await Message.objects.acreate(conversation=conversation, position=position, **fields)
    last = await Message.objects.aget(conversation=conversation, position=3)
    await Rating.objects.acreate(
        message=last, conversation=conversation, value="up", comment="Quick and right."
    )
    await Annotation.objects.acreate(
        conversation=conversation, kind="flag", value="personal_data", author=reviewer
    )
    await Annotation.objects.acreate(
        conversation=conversation, message=last, kind="note", author=reviewer,
        note="The redaction interceptor caught the card number.",
    )  # fmt: skip
    return conversation


@pytest.mark.parametrize("scheme", ["light", "dark"])
async def test_the_admin_transcript_and_dashboard_render_with_nothing_from_elsewhere(
    browser, server, user, superuser, scheme
):
    from django.core.management import call_command

    await sync_to_async(call_command)(
        "generatetranscripts", conversations=120, messages=6, days=30, users=8, stdout=io.StringIO()
    )
    conversation = await reviewed_conversation(user, superuser)
    async with open_page(browser, server, superuser) as page:
        await page.emulate_media(color_scheme=scheme)
        await page.set_viewport_size({"width": 1280, "height": 1000})

        await page.goto(f"/admin/chatproxy/conversation/{conversation.pk}/change/")
        bubbles = page.locator(".chatproxy-bubble")
        await expect(bubbles).to_have_count(4)
        await expect(page.locator(".chatproxy-reasoning")).not_to_have_attribute("open", "")
        await expect(page.locator(".chatproxy-diff ins")).to_have_text("[redacted]")
        await expect(page.get_by_role("heading", name="Review")).to_be_visible()
        user_bubble, answer = (
            await bubbles.nth(0).bounding_box(),
            await bubbles.nth(3).bounding_box(),
        )
        assert user_bubble["x"] > answer["x"]  # the user's on the right, as in the chat
        await shoot(page, "transcript", scheme, full_page=True)

        await page.goto("/admin/chatproxy/conversation/dashboard/?days=30")
        charts = page.locator(".chatproxy-dashboard svg[role=img]")
        await expect(charts).to_have_count(7)
        await expect(page.locator(".chatproxy-dashboard table")).to_have_count(7)
        bar = page.locator(".chatproxy-dashboard rect.bar").first
        fill = await bar.evaluate("e => getComputedStyle(e).fill")
        background = await page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert fill != background and fill not in ("none", "rgb(0, 0, 0)")
        await shoot(page, "dashboard", scheme, full_page=True)

        await page.goto("/admin/chatproxy/conversation/?review=flagged")
        await expect(page.locator("#result_list tbody tr")).to_have_count(
            await Conversation.objects.filter(annotations__kind="flag").distinct().acount()
        )
        await shoot(page, "list", scheme)
    assert (DOCS / f"reviewing-dashboard-{scheme}.png").stat().st_size > 20_000


# Steering a conversation (issue 21): regenerate, edit, switch branches, rename, delete, reload.


def content_of(message: Any) -> Any:
    return message.locator(".chatproxy-message__content")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_regenerate_adds_a_branch_and_the_switcher_moves_between_them(
    page, upstream, transport
):
    upstream.enqueue(Reply(tokens=["Paris."]), Reply(tokens=["Paris, ", "surely."]))
    await use_transport(page, transport)
    first = await send(page, "Capital of France?")
    await expect(first).to_have_attribute("data-status", "completed")

    await first.get_by_role("button", name="Regenerate").click()

    again = page.locator(".chatproxy-message--assistant")
    await expect(again).to_have_count(1)
    await expect(content_of(again)).to_have_text("Paris, surely.")
    await expect(again.locator(".chatproxy-branch__count")).to_have_text("2 / 2")
    assert upstream.requests[-1].json["messages"] == [
        {"role": "user", "content": "Capital of France?"}
    ]
    await again.get_by_role("button", name="Previous branch").click()
    await expect(content_of(page.locator(".chatproxy-message--assistant"))).to_have_text("Paris.")
    await expect(page.locator(".chatproxy-branch__count")).to_have_text("1 / 2")
    assert await Message.objects.filter(role="assistant").acount() == 2


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_edit_asks_the_new_question_on_a_branch_of_its_own(page, upstream, transport):
    upstream.enqueue(Reply(tokens=["Hello!"]), Reply(tokens=["Bonjour !"]))
    await use_transport(page, transport)
    first = await send(page, "Say hi")
    await expect(first).to_have_attribute("data-status", "completed")
    question = page.locator(".chatproxy-message--user")

    await question.get_by_role("button", name="Edit").click()
    await page.get_by_label("Edit message").fill("Say hi in French")
    await question.get_by_role("button", name="Save and send").click()

    answer = page.locator(".chatproxy-message--assistant")
    await expect(content_of(answer)).to_have_text("Bonjour !")
    await expect(answer).to_have_attribute("data-status", "completed")
    await expect(content_of(page.locator(".chatproxy-message--user"))).to_have_text(
        "Say hi in French"
    )
    await expect(page.locator(".chatproxy-message--user .chatproxy-branch__count")).to_have_text(
        "2 / 2"
    )
    assert upstream.requests[-1].json["messages"] == [
        {"role": "user", "content": "Say hi in French"}
    ]
    await page.get_by_role("button", name="Previous branch").click()
    await expect(page.locator(".chatproxy-message__content")).to_have_text(["Say hi", "Hello!"])


async def test_rename_and_delete_from_the_list(page, upstream):
    upstream.enqueue(Reply(tokens=["ok"]))
    answer = await send(page, "Old title")
    await expect(answer).to_have_attribute("data-status", "completed")

    listed = page.locator(".chatproxy-conversations__item")
    await listed.get_by_role("button", name="Rename", exact=True).click()
    await page.get_by_label("New title").fill("New title")
    await page.get_by_label("New title").press("Enter")
    await expect(page.get_by_role("button", name=re.compile("^New title"))).to_be_visible()
    await expect(page.locator("#chatproxy-title")).to_have_text("New title")
    await listed.get_by_role("button", name="Delete", exact=True).click()
    await listed.get_by_role("button", name="Really delete?").click()

    await expect(page.locator(".chatproxy-conversation")).to_have_count(0)
    await expect(page.locator("#chatproxy-title")).to_have_text("New chat")
    assert await Conversation.objects.acount() == 0


async def test_the_url_names_the_conversation_and_a_reload_opens_it(page, upstream):
    upstream.enqueue(Reply(tokens=["Paris."]))
    answer = await send(page, "Capital of France?")
    await expect(answer).to_have_attribute("data-status", "completed")
    conversation_id = str((await Conversation.objects.aget()).pk)
    await expect(page).to_have_url(re.compile(f"\\?c={conversation_id}$"))

    await page.reload()

    await expect(page.locator(".chatproxy-message")).to_have_text(
        [re.compile("Capital of France"), re.compile("Paris.")]
    )
    await expect(page.locator("#chatproxy-title")).to_have_text("Capital of France?")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_reload_mid_answer_keeps_it_streaming_to_the_end(page, upstream, transport):
    words = [f"word{i} " for i in range(120)]
    upstream.enqueue(Reply(tokens=words, delay=0.03))
    await use_transport(page, transport)
    answer = await send(page, "Tell me a long story")
    await expect(content_of(answer)).to_contain_text("word5")
    message_id = await answer.get_attribute("data-message-id")

    await page.reload()

    resumed = page.locator(".chatproxy-message--assistant")
    await expect(resumed).to_have_attribute("data-message-id", message_id)
    await expect(resumed).to_have_attribute("data-status", "streaming")
    await expect(resumed).to_have_attribute("data-status", "completed", timeout=15_000)
    await expect(content_of(resumed)).to_have_text("".join(words).strip())
    row = await Message.objects.aget(pk=message_id)
    assert (row.status, row.content) == ("completed", "".join(words))
    assert len(upstream.requests) == 1  # followed, not asked again
    renders = await page.evaluate("window.__renders")
    assert any(r["status"] == "streaming" and "word" in r["text"] for r in renders), renders


async def test_the_list_searches_and_pages_through_the_conversations(page, user):
    rows = [Conversation(owner=user, title=f"Recipe {i}") for i in range(50)]
    await Conversation.objects.abulk_create(
        [Conversation(owner=user, title="Trip to Lisbon"), *rows]
    )
    await page.reload()
    listed = page.locator(".chatproxy-conversation")
    await expect(listed).to_have_count(50)

    await page.get_by_role("button", name="More conversations").click()
    await expect(listed).to_have_count(51)
    await expect(page.get_by_role("button", name="More conversations")).to_be_hidden()
    await page.get_by_label("Search conversations").fill("lisbon")

    await expect(listed).to_have_count(1)
    await expect(listed).to_contain_text("Trip to Lisbon")
    await page.get_by_label("Search conversations").fill("nothing like it")
    await expect(page.get_by_text("No conversation matches.")).to_be_visible()


@pytest.fixture(scope="module")
def budgets_server(django_db_setup: Any, django_db_blocker: Any, upstream_server: Any) -> Any:
    """A server with budgets on but none by default: each test gives its user theirs."""
    process = ServerProcess(
        shared_database_name(django_db_blocker),
        upstream_server.base_url,
        {"CHATPROXY_BUDGETS": {}, "CHATPROXY_RATE_LIMIT": None},
    )
    process.start()
    yield process
    process.stop()


def budgets_region(page: Page) -> Any:
    return page.get_by_role("region", name="Budgets", include_hidden=True)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_the_sidebar_shows_the_callers_budgets_and_refreshes_them_after_a_turn(
    browser, budgets_server, upstream, user, transport
):
    # The page sends no max_tokens: a turn reserves CHATPROXY_BUDGET_MAX_TOKENS (4096) and more.
    await Budget.objects.acreate(scope=Scope.USER, user=user, period=Period.DAY, tokens=10_000)
    async with open_page(browser, budgets_server, user) as page:
        region = budgets_region(page)
        await expect(region).to_be_visible()
        await expect(region.get_by_role("listitem")).to_have_count(1)
        await expect(region).to_contain_text("Your daily budget")
        await expect(region).to_contain_text("10000 of 10000 tokens left")
        resets = region.locator("time")
        await expect(resets).to_have_attribute("datetime", re.compile(r"^\d{4}-\d\d-\d\dT00:00"))
        await use_transport(page, transport)

        answer = await send(page, "Hi")

        await expect(answer).to_have_attribute("data-status", "completed")
        spend = await Spend.objects.aget()
        await expect(region).to_contain_text(f"{10_000 - spend.tokens} of 10000 tokens left")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_refusal_over_budget_is_shown_with_what_the_budget_has_left(
    browser, budgets_server, upstream, user, transport
):
    await Budget.objects.acreate(scope=Scope.USER, user=user, period=Period.DAY, tokens=100)
    async with open_page(browser, budgets_server, user) as page:
        await expect(budgets_region(page)).to_contain_text("100 of 100 tokens left")
        await use_transport(page, transport)

        await send(page, "Hi")

        await expect(page.get_by_role("alert")).to_contain_text(
            "Your daily budget has 100 of 100 tokens left; this request may use up to"
        )
        await expect(page.get_by_role("alert")).to_contain_text("budget_exceeded")
        await expect(page.get_by_label("Message", exact=True)).to_have_value("Hi")
    assert upstream.requests == []


async def test_the_budgets_region_is_hidden_while_none_applies(browser, budgets_server, user):
    async with open_page(browser, budgets_server, user) as page:
        await page.wait_for_load_state("networkidle")  # GET budgets answered

        await expect(budgets_region(page)).to_be_hidden()
        await expect(budgets_region(page).get_by_role("listitem")).to_have_count(0)


async def test_the_page_has_no_budgets_region_with_budgets_off(page):
    await expect(budgets_region(page)).to_have_count(0)
