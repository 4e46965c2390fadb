"""Staff read transcripts in the admin; nobody edits them; non-staff see nothing. Staff make API
keys for themselves; a key for someone else needs its own permission."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth.models import Permission
from django.test import Client

from chatproxy.models import ApiKey, Conversation, Message
from chatproxy.owners import Owner

pytestmark = pytest.mark.django_db


@pytest.fixture
def conversation(user):
    conversation_id, answer_id = Conversation.objects.start_turn(
        Owner(user_id=user.pk),
        None,
        [{"role": "user", "content": "What is <b>2+2</b>?"}],
        "gpt-test",
    )
    Message.objects.filter(pk=answer_id).update(
        content="It is 4.", status="completed", total_tokens=12, first_token_ms=35, duration_ms=120
    )
    Conversation.objects.filter(pk=conversation_id).update(status="completed")
    return Conversation.objects.get(pk=conversation_id)


@pytest.fixture
def staff_client(django_user_model):
    staff = django_user_model.objects.create_user("staff", password="pw", is_staff=True)
    staff.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_conversation", "view_message"])
    )
    c = Client()
    c.force_login(staff)
    return c


def test_staff_see_the_conversation_list_with_title_owner_and_status(staff_client, conversation):
    response = staff_client.get("/admin/chatproxy/conversation/")

    assert response.status_code == 200
    html = response.content.decode()
    assert "What is &lt;b&gt;2+2&lt;/b&gt;?" in html
    assert "alice" in html
    assert "gpt-test" in html


def test_staff_read_the_transcript_in_order_and_read_only(staff_client, conversation):
    response = staff_client.get(f"/admin/chatproxy/conversation/{conversation.pk}/change/")

    assert response.status_code == 200
    html = response.content.decode()
    assert html.index("What is &lt;b&gt;2+2&lt;/b&gt;?") < html.index("It is 4.")
    assert "<b>2+2</b>" not in html
    assert 'name="_save"' not in html
    assert "120" in html and "35" in html


def test_search_finds_conversations_by_message_text(staff_client, conversation):
    response = staff_client.get("/admin/chatproxy/conversation/", {"q": "It is 4"})

    assert response.context["cl"].result_count == 1


def test_filter_by_status(staff_client, conversation):
    assert (
        staff_client.get("/admin/chatproxy/conversation/", {"status": "failed"})
        .context["cl"]
        .result_count
        == 0
    )
    assert (
        staff_client.get("/admin/chatproxy/conversation/", {"status": "completed"})
        .context["cl"]
        .result_count
        == 1
    )


def test_messages_cannot_be_changed_or_added_in_admin(staff_client, conversation):
    answer = Message.objects.get(role="assistant")

    post = staff_client.post(
        f"/admin/chatproxy/message/{answer.pk}/change/", {"content": "rewritten"}
    )
    add = staff_client.get("/admin/chatproxy/message/add/")

    assert post.status_code == 403
    assert add.status_code == 403
    answer.refresh_from_db()
    assert answer.content == "It is 4."


def test_non_staff_users_are_sent_to_the_login_page(user, conversation):
    c = Client()
    c.force_login(user)

    response = c.get("/admin/chatproxy/conversation/")

    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]


def test_staff_without_view_permission_are_refused(django_user_model, conversation):
    c = Client()
    c.force_login(django_user_model.objects.create_user("clerk", password="pw", is_staff=True))

    assert c.get(f"/admin/chatproxy/conversation/{conversation.pk}/change/").status_code == 403


def test_message_count_stays_true_when_a_search_matches_several_messages(
    staff_client, conversation, user
):
    for _ in range(2):  # two more turns: six messages, each answer matching the search
        _, answer_id = Conversation.objects.start_turn(
            Owner(user_id=user.pk), conversation.pk, [{"role": "user", "content": "Again?"}], "m"
        )
        Message.objects.filter(pk=answer_id).update(content="It is 4.", status="completed")

    response = staff_client.get("/admin/chatproxy/conversation/", {"q": "It is 4"})

    assert response.context["cl"].result_count == 1
    assert '<td class="field-message_count">6</td>' in response.content.decode()


# API keys: a key acts as its user on the chat API, transcripts included.

ADD_KEY = "/admin/chatproxy/apikey/add/"
RAW_KEY = re.compile(r"cpx_[0-9a-f]{8}_[A-Za-z0-9_-]{43}")
OWN_KEYS_ONLY = (
    "You may create API keys only for yourself: a key lets whoever holds it act as its user. "
    "Creating one for another user needs the “Can create API keys for other users” permission."
)


def staff_with(django_user_model, username, *codenames):
    staff = django_user_model.objects.create_user(username, password="pw", is_staff=True)
    staff.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    c = Client()
    c.force_login(staff)
    return staff, c


def test_staff_who_may_add_keys_get_the_form_for_a_key_of_their_own(django_user_model):
    clerk, c = staff_with(django_user_model, "clerk", "add_apikey")

    form = c.get(ADD_KEY).content.decode()

    assert re.search(rf'<input [^>]*name="user" value="{clerk.pk}"', form)


def test_staff_who_may_only_add_keys_make_them_for_themselves(django_user_model):
    clerk, c = staff_with(django_user_model, "clerk", "add_apikey")

    response = c.post(ADD_KEY, {"user": clerk.pk, "name": "mine"})

    assert response.status_code == 200
    raw = RAW_KEY.search(response.content.decode()).group()
    assert ApiKey.objects.user_for(raw) == clerk


@pytest.mark.parametrize("whose", ["another user", "a superuser"])
def test_staff_who_may_only_add_keys_are_refused_a_key_for_anyone_else(
    django_user_model, user, whose
):
    root = django_user_model.objects.create_superuser("root", password="pw")
    _, c = staff_with(django_user_model, "clerk", "add_apikey")
    target = user if whose == "another user" else root

    response = c.post(ADD_KEY, {"user": target.pk, "name": "theirs"})

    assert response.status_code == 200
    assert response.context["adminform"].form.errors == {"user": [OWN_KEYS_ONLY]}
    assert not RAW_KEY.search(response.content.decode())
    assert not ApiKey.objects.exists()


def test_staff_with_the_permission_make_keys_for_anyone(django_user_model, user):
    root = django_user_model.objects.create_superuser("root", password="pw")
    _, c = staff_with(django_user_model, "issuer", "add_apikey", "issue_apikey_for_others")

    for target in (user, root):
        response = c.post(ADD_KEY, {"user": target.pk, "name": "theirs"})
        raw = RAW_KEY.search(response.content.decode()).group()
        assert ApiKey.objects.user_for(raw) == target


def test_superusers_make_keys_for_anyone(django_user_model, user):
    c = Client()
    c.force_login(django_user_model.objects.create_superuser("root", password="pw"))

    response = c.post(ADD_KEY, {"user": user.pk, "name": "theirs"})

    raw = RAW_KEY.search(response.content.decode()).group()
    assert ApiKey.objects.user_for(raw) == user


def test_staff_who_may_change_keys_revoke_anyones_but_never_unrevoke_one(django_user_model, user):
    key, raw = ApiKey.objects.issue(user, "alices")
    _, c = staff_with(django_user_model, "revoker", "view_apikey", "change_apikey")
    change = f"/admin/chatproxy/apikey/{key.pk}/change/"

    revoked = c.post(change, {"name": "alices", "revoked": "on"})
    unrevoked = c.post(change, {"name": "alices"})

    assert revoked.status_code == unrevoked.status_code == 302
    assert ApiKey.objects.get().revoked
    assert ApiKey.objects.user_for(raw) is None


PNG_URL = "data:image/png;base64,iVBORw0KGgoAAAAA"


@pytest.fixture
def tool_conversation(user):
    conversation = Conversation.objects.create(owner=user, title="Time")
    rows = [
        {
            "role": "user",
            "content": "What time is it? <script>alert(1)</script>",
            "parts": [
                {"type": "text", "text": "What time is it? <script>alert(1)</script>"},
                {"type": "image_url", "image_url": {"url": PNG_URL}},
                {"type": "image_url", "image_url": {"url": "javascript:alert(2)"}},
                {"type": "text", "text": "Second part"},
            ],
        },
        {
            "role": "assistant",
            "content": "",
            "reasoning": "The user wants <b>the time</b>.",
            "tool_calls": [{"id": "call_1", "name": "get_time", "arguments": '{"zone":"UTC"}'}],
            "status": "completed",
        },
        {"role": "tool", "content": "12:00", "tool_call_id": "call_1"},
    ]
    for position, fields in enumerate(rows):
        Message.objects.create(conversation=conversation, position=position, **fields)
    return conversation


def test_transcript_shows_parts_in_order_reasoning_folded_and_tool_calls_pretty(
    staff_client, tool_conversation
):
    response = staff_client.get(f"/admin/chatproxy/conversation/{tool_conversation.pk}/change/")

    html = response.content.decode()
    assert response.status_code == 200
    first = html.index("What time is it? &lt;script&gt;alert(1)&lt;/script&gt;</p>")
    thumbnail = html.index(f'<img src="{PNG_URL}"')
    assert first < thumbnail < html.index("[an image not shown") < html.index("Second part</p>")
    assert '<details class="chatproxy-reasoning"><summary>' in html  # folded: no open attribute
    assert "The user wants &lt;b&gt;the time&lt;/b&gt;." in html
    assert "Tool call <strong>get_time</strong> <code>call_1</code>" in html
    assert "{\n  &quot;zone&quot;: &quot;UTC&quot;\n}" in html
    assert "Result of the tool call <code>call_1</code>" in html


def test_transcript_draws_no_script_and_only_safe_image_urls(staff_client, tool_conversation):
    html = staff_client.get(
        f"/admin/chatproxy/conversation/{tool_conversation.pk}/change/"
    ).content.decode()

    assert "<script>alert(1)" not in html and "<b>the time</b>" not in html
    assert "javascript:alert(2)" not in html
    assert 'referrerpolicy="no-referrer"' in html and "max-width: 240px" in html


def test_a_data_url_larger_than_the_image_limit_is_named_not_drawn(
    staff_client, tool_conversation, settings
):
    settings.CHATPROXY_MAX_IMAGE_BYTES = 1
    html = staff_client.get(
        f"/admin/chatproxy/conversation/{tool_conversation.pk}/change/"
    ).content.decode()

    assert f'<img src="{PNG_URL}"' not in html
    assert html.count("[an image not shown") == 2


def test_transcript_shows_each_step_of_a_server_tool_loop_with_its_timing(staff_client, user):
    conversation = Conversation.objects.create(owner=user, title="Loop")
    rows = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "Looking.",
            "tool_calls": [{"id": "call_1", "name": "weather", "arguments": "{}"}],
            "status": "completed",
            "finish_reason": "tool_calls",
        },
        {
            "role": "tool",
            "content": '{"error":"The tool weather failed."}',
            "tool_call_id": "call_1",
            "metadata": {"name": "weather", "duration_ms": 12, "error": True},
        },
        {"role": "assistant", "content": "Sorry, no weather today.", "status": "completed"},
    ]
    for position, fields in enumerate(rows):
        Message.objects.create(conversation=conversation, position=position, **fields)
    response = staff_client.get(f"/admin/chatproxy/conversation/{conversation.pk}/change/")

    html = response.content.decode()
    step = html.index("Tool call <strong>weather</strong> <code>call_1</code>")
    result = html.index(
        "Result of the tool call <code>call_1</code>, run on the server by "
        "<strong>weather</strong> in 12 ms: <strong>failed</strong>"
    )
    assert step < result < html.index("Sorry, no weather today.")


def test_the_transcript_shows_the_active_branch_with_its_siblings_reachable(
    staff_client, conversation, user
):
    question = conversation.messages.get(role="user")
    first = conversation.messages.get(role="assistant")
    _, second = Conversation.objects.start_turn(
        Owner(user_id=user.pk), conversation.pk, [], "gpt-test", parent=question.pk
    )
    Message.objects.filter(pk=second).update(content="Four.", status="completed")
    url = f"/admin/chatproxy/conversation/{conversation.pk}/change/"

    active = staff_client.get(url).content.decode()
    other = staff_client.get(f"{url}?branch={first.pk}").content.decode()

    section = active.split('id="chatproxy-branches"', 1)[1].split("</fieldset>", 1)[0]
    assert "Branches (2)" in section and "Four." in section and "It is 4." not in section
    assert f'href="?branch={first.pk}"' in section
    elsewhere = other.split('id="chatproxy-branches"', 1)[1].split("</fieldset>", 1)[0]
    assert "It is 4." in elsewhere and "Four." not in elsewhere
    assert "Back to the active branch" in elsewhere
    assert Conversation.objects.get(pk=conversation.pk).active_leaf_id == second
