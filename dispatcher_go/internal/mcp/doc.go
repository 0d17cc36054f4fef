// Package mcp speaks the Model Context Protocol both ways, with the official
// Go SDK (github.com/modelcontextprotocol/go-sdk).
//
// As a client (Manager, client.go): the MCP servers of the --mcp-servers
// file (config.go: stdio commands and streamable-HTTP URLs) become local
// tool providers of the broker; their tools are served as
// mcp.<server>.<tool> with their JSON Schemas, behind the broker's checks,
// timeouts and size limit. A call's context is the broker's: a stop or a
// timeout cancels it (notifications/cancelled on stdio, the request's
// stream closed on HTTP). A server that ends (a crashed process) is started
// again with backoff; meanwhile its tools stay listed and their calls fail
// at once with PROVIDER_UNAVAILABLE. The file is reloaded when it changes;
// a bad file is logged and the servers in force stay.
//
// As a server (NewServer, server.go): the dispatcher's /mcp endpoint,
// stateless streamable HTTP, with run_task (a task on our agents, its events
// as progress notifications, the call's cancel or closed stream cancels the
// task) and every brokered tool (the policy in force applies first).
//
// It must not decide tool routing or policy itself (the broker and the
// policy engine do), keep state per MCP client (stateless: any replica can
// answer), or pass the dispatcher's environment (tokens, the secret key) to
// a stdio server.
package mcp
