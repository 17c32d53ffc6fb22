/* A C program using libkiln (runtime/ffi, header runtime/ffi/include/kiln.h): an assistant on
 * a pair of glasses calls one of its tools, gets the result back and answers; then fills a
 * form as JSON that must fit a schema; then stops a reply from its streaming callback.
 *
 *   cargo build --release -p kiln-ffi
 *   cc examples/c/chat.c -I runtime/ffi/include -L target/release -lkiln -Wl,-rpath,target/release -o chat
 *   ./chat model.kiln
 *
 * Each step prints one line a script can read: TOOL_CALLS, ANSWER, JSON, STOPPED.
 */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kiln.h"

static const char *TOOLS =
    "[{\"type\": \"function\", \"function\": {\"name\": \"get_weather\","
    "  \"description\": \"Current weather in a city\","
    "  \"parameters\": {\"type\": \"object\", \"properties\": {"
    "    \"city\": {\"type\": \"string\", \"minLength\": 1, \"maxLength\": 40}},"
    "    \"required\": [\"city\"], \"additionalProperties\": false}}},"
    " {\"type\": \"function\", \"function\": {\"name\": \"set_timer\","
    "  \"description\": \"Start a timer on the glasses\","
    "  \"parameters\": {\"type\": \"object\", \"properties\": {"
    "    \"minutes\": {\"type\": \"integer\", \"minimum\": 1, \"maximum\": 120}},"
    "    \"required\": [\"minutes\"], \"additionalProperties\": false}}}]";

static const char *TIMER_SCHEMA =
    "{\"type\": \"object\", \"properties\": {"
    "  \"minutes\": {\"type\": \"integer\", \"minimum\": 1, \"maximum\": 120},"
    "  \"label\": {\"type\": \"string\", \"minLength\": 1, \"maxLength\": 20}},"
    " \"required\": [\"minutes\", \"label\"], \"additionalProperties\": false}";

/* Exits with kiln's message when a call failed. */
static void check(KilnStatus status, const char *what) {
    if (status != KILN_OK) {
        fprintf(stderr, "%s failed (%d): %s\n", what, (int)status, kiln_last_error());
        exit(1);
    }
}

/* Streams a reply's text to stderr; never stops it. */
static int32_t show(const char *text, size_t len, void *user) {
    (void)user;
    fwrite(text, 1, len, stderr);
    return 0;
}

/* Stops a reply after as many pieces as *user says. */
static int32_t stop_after(const char *text, size_t len, void *user) {
    int *left = user;
    (void)text;
    (void)len;
    return --*left <= 0;
}

/* The value of the first "id" in a reply's JSON, copied into out. */
static void first_call_id(const char *reply, char *out, size_t size) {
    const char *at = strstr(reply, "\"id\":\"");
    size_t n = 0;
    if (at) {
        at += strlen("\"id\":\"");
        while (at[n] && at[n] != '"' && n + 1 < size) {
            out[n] = at[n];
            n++;
        }
    }
    out[n] = '\0';
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s MODEL.kiln\n", argv[0]);
        return 2;
    }
    KilnModel *model = NULL;
    check(kiln_model_open(argv[1], &model), "kiln_model_open");
    KilnChat *chat = NULL;
    check(kiln_chat_new(model, "You are the assistant of a pair of smart glasses.", 1024, 2, &chat),
          "kiln_chat_new");

    /* 1. A tool call the reply must make, its result, the answer. */
    check(kiln_chat_add(chat, "user", "What is the weather like in Lyon?"), "kiln_chat_add");
    char options[2048];
    snprintf(options, sizeof options,
             "{\"tools\": %s, \"tool_choice\": \"required\", \"temperature\": 0}", TOOLS);
    char *reply = NULL;
    check(kiln_chat_reply(chat, options, show, NULL, &reply), "kiln_chat_reply (tool call)");
    printf("TOOL_CALLS %s\n", reply);
    char id[64];
    first_call_id(reply, id, sizeof id);
    kiln_string_free(reply);
    check(kiln_chat_tool_result(chat, id, "{\"temperature\": 11, \"sky\": \"rain\"}"),
          "kiln_chat_tool_result");
    check(kiln_chat_reply(chat, "{\"temperature\": 0, \"max_tokens\": 40}", show, NULL, &reply),
          "kiln_chat_reply (answer)");
    fputc('\n', stderr);
    printf("ANSWER %s\n", reply);
    kiln_string_free(reply);

    /* 2. A reply that must be JSON fitting a schema. */
    check(kiln_chat_add(chat, "user", "Set a timer for the pasta."), "kiln_chat_add");
    snprintf(options, sizeof options,
             "{\"response_format\": {\"type\": \"json_schema\", \"json_schema\": {\"schema\": %s}},"
             " \"temperature\": 0}",
             TIMER_SCHEMA);
    check(kiln_chat_reply(chat, options, show, NULL, &reply), "kiln_chat_reply (JSON)");
    fputc('\n', stderr);
    printf("JSON %s\n", reply);
    kiln_string_free(reply);

    /* 3. A reply stopped by its callback after three pieces. */
    check(kiln_chat_add(chat, "user", "Tell me a long story about a lighthouse."), "kiln_chat_add");
    int left = 3;
    check(kiln_chat_reply(chat, "{\"max_tokens\": 200}", stop_after, &left, &reply),
          "kiln_chat_reply (stopped)");
    printf("STOPPED %s\n", reply);
    kiln_string_free(reply);

    /* An error is a status and a message, never a crash. */
    if (kiln_chat_reply(chat, "{\"tool_choice\": \"required\"}", NULL, NULL, &reply) == KILN_OK) {
        fprintf(stderr, "a required call without tools was accepted\n");
        return 1;
    }
    printf("REFUSED %s\n", kiln_last_error());

    kiln_chat_free(chat);
    kiln_model_free(model);
    return 0;
}
