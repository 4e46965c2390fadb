"""The admin as a reviewer's workspace: the transcript reads like the chat, the list finds
conversations by what happened in them, and reviewers mark them up without editing them."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.utils import timezone

from chatproxy.feedback import Rating
from chatproxy.models import Conversation, Message
from chatproxy.review import Annotation

pytestmark = pytest.mark.django_db

LIST = "/admin/chatproxy/conversation/"


def change_url(conversation) -> str:
    return f"/admin/chatproxy/conversation/{conversation.pk}/change/"


def review_url(conversation) -> str:
    return f"/admin/chatproxy/conversation/{conversation.pk}/review/"


def staff_client(django_user_model, username, *codenames):
    staff = django_user_model.objects.create_user(username, password="pw", is_staff=True)
    staff.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    c = Client()
    c.force_login(staff)
    return staff, c


@pytest.fixture
def reader(django_user_model):
    return staff_client(django_user_model, "reader", "view_conversation")[1]


@pytest.fixture
def reviewer(django_user_model):
    return staff_client(django_user_model, "reviewer", "view_conversation", "review_conversation")


def make_conversation(owner=None, session_key="", rows=(), **fields):
    conversation = Conversation.objects.create(owner=owner, session_key=session_key, **fields)
    for position, row in enumerate(rows):
        Message.objects.create(conversation=conversation, position=position, **row)
    return conversation


ANSWER = {
    "role": "assistant",
    "content": "It is 4.",
    "status": "completed",
    "model": "gpt-test",
    "total_tokens": 12,
    "prompt_tokens": 8,
    "completion_tokens": 4,
    "first_token_ms": 35,
    "duration_ms": 120,
    "cost": Decimal("0.000150"),
}


@pytest.fixture
def conversation(user):
    return make_conversation(
        user,
        title="Sums",
        model="gpt-test",
        status="failed",
        rows=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2+2?"},
            ANSWER,
            {"role": "user", "content": "And 3+3?"},
            {
                "role": "assistant",
                "content": "",
                "status": "failed",
                "model": "gpt-test",
                "error_code": "upstream_timeout",
                "error_message": "The upstream did not answer in time.",
            },
        ],
    )


def test_transcript_shows_each_message_as_a_bubble_of_its_role_in_order(reader, conversation):
    html = reader.get(change_url(conversation)).content.decode()

    roles = re.findall(r'<article class="chatproxy-bubble chatproxy-(\w+)"', html)
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert html.index("Be brief.") < html.index("What is 2+2?") < html.index("It is 4.")
    assert 'name="_save"' not in html and "<textarea" not in html


def test_each_answer_has_one_compact_metadata_line_and_details_on_demand(reader, conversation):
    html = reader.get(change_url(conversation)).content.decode()

    assert (
        '<p class="chatproxy-meta">completed · gpt-test · 12 tokens · first token 35 ms · '
        "120 ms · cost 0.000150</p>"
    ) in html
    assert '<p class="chatproxy-meta">failed · gpt-test · <span class="chatproxy-error">' in html
    assert '<details class="chatproxy-details"><summary>Details</summary>' in html
    assert "<dd>8 / 4 / — / —</dd>" in html
    assert "The upstream did not answer in time." in html
    assert html.count('class="chatproxy-meta"') == 2  # answers only, not the user's messages


def test_transcript_shows_the_conversations_totals(reader, conversation):
    html = reader.get(change_url(conversation)).content.decode()

    totals = re.search(r'<p class="chatproxy-totals">(.*?)</p>', html).group(1)
    assert re.sub(r"<[^>]+>", "", totals) == "2 answers · 12 tokens · cost 0.000150 · 1 error"


def test_interceptor_changed_text_shows_as_a_diff_of_delivered_and_upstream(reader, user):
    conversation = make_conversation(
        user,
        rows=[
            {"role": "user", "content": "My card?"},
            {
                **ANSWER,
                "content": "Your card is [redacted].",
                "raw_content": "Your card is 4111 1111.",
            },
        ],
    )

    html = reader.get(change_url(conversation)).content.decode()

    assert "Delivered (after interceptors)" in html and "From the upstream" in html
    assert "Your card is <ins>[redacted]</ins>." in html
    assert "Your card is <del>4111 1111</del>." in html


def test_list_shows_owner_tokens_cost_count_and_last_activity(reader, conversation):
    response = reader.get(LIST)

    html = response.content.decode()
    # Sortable (Django 6.1 numbers the columns and marks the link up differently).
    assert re.search(
        r'class="sortable column-owned_by">\s*<div class="text"><a [^>]*>Owner</a>', html
    )
    assert '<td class="field-owned_by">alice</td>' in html
    assert '<td class="field-message_count">5</td>' in html
    assert '<td class="field-tokens">12</td>' in html
    assert '<td class="field-cost">0.000150</td>' in html
    assert '<td class="field-updated_at nowrap">' in html


def test_list_totals_stay_true_when_a_search_matches_several_messages(reader, conversation):
    response = reader.get(LIST, {"q": "2+2"})  # matches the question; "is" matches more rows
    again = reader.get(LIST, {"q": "is"})

    assert response.context["cl"].result_count == again.context["cl"].result_count == 1
    assert '<td class="field-tokens">12</td>' in again.content.decode()
    assert '<td class="field-message_count">5</td>' in again.content.decode()


def test_anonymous_owners_are_told_apart_without_showing_their_session_key(reader):
    for key in ("a" * 32, "b" * 32, "ws-" + "c" * 32):
        make_conversation(session_key=key, title=key[:3])

    html = reader.get(LIST).content.decode()

    owners = re.findall(r'<td class="field-owned_by">([^<]*)</td>', html)
    assert len(set(owners)) == 3
    assert all(re.fullmatch(r"anonymous (session|socket) [0-9a-f]{8}", o) for o in owners)
    assert "a" * 32 not in html and "b" * 32 not in html


def count(c, **query) -> int:
    return c.get(LIST, query).context["cl"].result_count


def test_filters_by_error_code_and_owner(reader, conversation):
    make_conversation(session_key="s" * 32, rows=[{"role": "user", "content": "Hi"}, ANSWER])

    assert count(reader, error_code="upstream_timeout") == 1
    assert count(reader, error_code="content_blocked") == 0
    assert count(reader, owner="anonymous") == 1
    assert count(reader, owner="users") == 1
    assert count(reader, owner=str(conversation.owner_id)) == 1
    html = reader.get(LIST).content.decode()
    assert "?error_code=upstream_timeout" in html  # offered: it occurs


def test_filters_by_rating_flag_and_review_state(reader, conversation, user):
    other = make_conversation(user, rows=[{"role": "user", "content": "Hi"}, ANSWER])
    answer = conversation.messages.get(position=2)
    Rating.objects.create(message=answer, conversation=conversation, value="down")
    Annotation.objects.create(conversation=conversation, kind="flag", value="wrong_answer")
    Annotation.objects.create(conversation=other, kind="reviewed")

    assert count(reader, rating="down") == 1
    assert count(reader, rating="up") == 0
    assert count(reader, rating="none") == 1
    assert count(reader, flag="wrong_answer") == 1
    assert count(reader, flag="personal_data") == 0
    assert count(reader, review="reviewed") == 1
    assert count(reader, review="unreviewed") == 1
    assert count(reader, review="flagged") == 1


def test_a_rating_shows_beside_its_answer(reader, conversation):
    answer = conversation.messages.get(position=2)
    Rating.objects.create(
        message=answer, conversation=conversation, value="down", comment="<b>Wrong</b>"
    )

    html = reader.get(change_url(conversation)).content.decode()

    assert "Rated <strong>down</strong> by the owner: “&lt;b&gt;Wrong&lt;/b&gt;”" in html
    assert html.index("It is 4.") < html.index("Rated <strong>down") < html.index("And 3+3?")


# Review by staff: a permission of its own; marks are added, kept with who and when.


def test_staff_who_may_only_view_get_no_review_form_and_cannot_post_one(reader, conversation):
    page = reader.get(change_url(conversation)).content.decode()
    posted = reader.post(review_url(conversation), {"note": "mine"})

    assert "chatproxy-review-form" not in page
    assert posted.status_code == 403
    assert not Annotation.objects.exists()


def test_a_reviewer_flags_tags_and_notes_an_answer(reviewer, conversation):
    staff, c = reviewer
    answer = conversation.messages.get(position=2)

    response = c.post(
        review_url(conversation),
        {
            "target": str(answer.pk),
            "flag": "wrong_answer",
            "tags": "Math, math, sums",
            "note": "2+2",
        },
    )

    assert response.status_code == 302 and response["Location"] == change_url(conversation)
    marks = Annotation.objects.order_by("pk")
    assert [(m.kind, m.value, m.note, m.message_id, m.author) for m in marks] == [
        ("flag", "wrong_answer", "", answer.pk, staff),
        ("tag", "math", "", answer.pk, staff),
        ("tag", "sums", "", answer.pk, staff),
        ("note", "", "2+2", answer.pk, staff),
    ]
    html = c.get(change_url(conversation)).content.decode()
    assert html.index("It is 4.") < html.index("<strong>Wrong answer</strong>")
    assert html.index("<strong>Wrong answer</strong>") < html.index("And 3+3?")
    assert "— reviewer, " in html


def test_a_reviewer_marks_the_conversation_reviewed_and_the_page_says_who_and_when(
    reviewer, conversation
):
    _, c = reviewer

    c.post(review_url(conversation), {"reviewed": "on", "note": "Checked."})

    mark = Annotation.objects.get(kind="reviewed")
    assert mark.message_id is None and mark.author.username == "reviewer"
    html = c.get(change_url(conversation)).content.decode()
    assert f"reviewed by reviewer on {timezone.localtime(mark.created_at):%Y-%m-%d %H:%M}" in html
    assert count(c, review="reviewed") == 1


def test_an_empty_review_says_what_to_add(reviewer, conversation):
    _, c = reviewer

    response = c.post(review_url(conversation), {"tags": " , "}, follow=True)

    assert response.redirect_chain == [(change_url(conversation), 302)]
    assert [str(m) for m in response.context["messages"]] == [
        "Add a flag, a tag or a note, or mark the conversation reviewed."
    ]
    assert not Annotation.objects.exists()


def test_flags_come_from_the_setting(reviewer, conversation, settings):
    settings.CHATPROXY_REVIEW_FLAGS = {"toxic": "Toxic"}
    _, c = reviewer

    refused = c.post(review_url(conversation), {"flag": "wrong_answer"}, follow=True)
    c.post(review_url(conversation), {"flag": "toxic"})

    assert [str(m) for m in refused.context["messages"]] == [
        "Flag: Select a valid choice. wrong_answer is not one of the available choices."
    ]
    assert list(Annotation.objects.values_list("value", flat=True)) == ["toxic"]


def test_an_answer_of_another_conversation_is_not_a_review_target(reviewer, conversation, user):
    other = make_conversation(user, rows=[{"role": "user", "content": "Hi"}, ANSWER])
    _, c = reviewer

    response = c.post(
        review_url(conversation),
        {"target": str(other.messages.get(position=1).pk), "note": "x"},
        follow=True,
    )

    assert "On: Select a valid choice." in str(list(response.context["messages"])[0])
    assert not Annotation.objects.exists()


def test_search_needs_every_word_in_the_title_the_owner_or_a_message(reader, conversation):
    make_conversation(None, session_key="x" * 32, title="Other", rows=[ANSWER])

    assert count(reader, q="Sums 3+3") == 1  # the title, and a message
    assert count(reader, q="alice brief") == 1  # the owner, and the system message
    assert count(reader, q="4.") == 2
    assert count(reader, q='"It is 4." brief') == 1
    assert count(reader, q="Sums zebra") == 0


def test_the_date_hierarchy_links_the_periods_that_have_conversations(reader, user):
    import datetime

    for when in ("2025-03-04 10:00", "2025-03-20 10:00", "2026-07-01 10:00"):
        conversation = make_conversation(user, title=when)
        moment = timezone.make_aware(datetime.datetime.fromisoformat(when))
        Conversation.objects.filter(pk=conversation.pk).update(created_at=moment)

    years = reader.get(LIST).context["cl"]
    march = reader.get(LIST, {"created_at__year": "2025", "created_at__month": "3"})
    html = march.content.decode()

    page = reader.get(LIST).content.decode()
    assert "?created_at__year=2025" in page and "?created_at__year=2026" in page
    assert years.result_count == 3
    assert march.context["cl"].result_count == 2
    assert "created_at__day=4" in html and "created_at__day=20" in html
    assert "created_at__day=5" not in html


def test_a_search_hides_the_date_hierarchy_and_keeps_a_date_already_chosen(reader, user):
    import datetime

    for when in ("2025-03-04 10:00", "2026-07-01 10:00"):
        conversation = make_conversation(user, title=f"Trip {when}")
        moment = timezone.make_aware(datetime.datetime.fromisoformat(when))
        Conversation.objects.filter(pk=conversation.pk).update(created_at=moment)

    searched = reader.get(LIST, {"q": "Trip"})
    in_2025 = reader.get(LIST, {"q": "Trip", "created_at__year": "2025"})

    assert searched.context["cl"].result_count == 2
    assert "toplinks" not in searched.content.decode()  # the date hierarchy
    assert "toplinks" in reader.get(LIST).content.decode()
    assert in_2025.context["cl"].result_count == 1


def test_a_search_pages_through_every_match_in_the_lists_order(reader, user):
    made = [
        make_conversation(user, title=f"Trip {i}", rows=[{"role": "user", "content": "x"}])
        for i in range(250)
    ]
    make_conversation(user, title="Other")
    newest_first = [str(c) for c in reversed(made)]

    pages = [reader.get(LIST, {"q": "trip", "p": str(p)}).context["cl"] for p in (1, 2, 3)]
    past_the_end = reader.get(LIST, {"q": "trip", "p": "4"})

    assert [cl.result_count for cl in pages] == [250, 250, 250]
    assert [len(cl.result_list) for cl in pages] == [100, 100, 50]
    assert [str(c) for cl in pages for c in cl.result_list] == newest_first
    assert pages[0].result_list[0].message_total == 1  # the list's totals are still there
    assert past_the_end.status_code == 302  # the admin's own answer: back to the first page


def test_a_search_scans_the_messages_once_for_the_page_and_its_count(reader, conversation):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as queries:
        response = reader.get(LIST, {"q": "brief"})

    assert response.context["cl"].result_count == 1
    scans = [q["sql"] for q in queries if "LIKE" in q["sql"] and "chatproxy_message" in q["sql"]]
    assert len(scans) == 1 and "OVER ()" in scans[0]
