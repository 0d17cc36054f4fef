// Package lybicsandbox creates sandboxes through the Lybic sandbox API (the
// Lybic cloud, or the project's local sandbox server, localsandbox/, which
// serves the same paths): what seed 001's POST /api/sandbox/create needs.
// It speaks the subset of the API the lybic SDK's Sandbox.create and
// get_shapes use: POST /api/orgs/{org}/sandboxes and GET
// /api/orgs/{org}/shapes, authenticated by the x-api-key header.
//
// It owns the HTTP calls, the shape fallback and the mapping of the API's
// errors; it must not decide who may create a sandbox (the HTTP adapter
// checks the client token and the request's limits), log or return a key,
// or call any endpoint but the configured one.
package lybicsandbox

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"
)

// DefaultEndpoint is the Lybic cloud.
const DefaultEndpoint = "https://api.lybic.cn"

// DefaultShape is seed 001's default shape.
const DefaultShape = "beijing-2c-4g-cpu"

// MaxLifeSeconds is the longest life the API allows (one day); the
// default is one hour.
const (
	MaxLifeSeconds     = 86400
	DefaultLifeSeconds = 3600
)

// Config is the dispatcher's sandbox API: its endpoint and credentials
// (from --sandbox-endpoint / LYBIC_API_ENDPOINT, --sandbox-org /
// LYBIC_ORG_ID, LYBIC_API_KEY) and the shape to use when a request names
// none or names one the endpoint does not offer.
type Config struct {
	Endpoint string
	OrgID    string
	APIKey   string
	// Shape replaces a requested shape the endpoint does not list (e.g. a
	// cloud shape on the local sandbox server); empty: such a request is
	// refused with the shapes the endpoint offers.
	Shape string
	// Timeout bounds one call (default 60 s: the cloud takes 1–3 s to
	// create, the local server a few to start a display).
	Timeout time.Duration
	// HTTP is the client (default: a new one with no redirects).
	HTTP *http.Client
}

// Client creates sandboxes on one endpoint.
type Client struct {
	cfg      Config
	endpoint *url.URL
}

// New checks cfg: the endpoint must be an http(s) URL without credentials,
// query or fragment.
func New(cfg Config) (*Client, error) {
	if cfg.Endpoint == "" {
		cfg.Endpoint = DefaultEndpoint
	}
	u, err := url.Parse(strings.TrimRight(cfg.Endpoint, "/"))
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil || u.RawQuery != "" || u.Fragment != "" {
		return nil, fmt.Errorf("sandbox endpoint %q: want http(s)://host[:port][/path]", cfg.Endpoint)
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 60 * time.Second
	}
	if cfg.HTTP == nil {
		cfg.HTTP = &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	}
	return &Client{cfg: cfg, endpoint: u}, nil
}

// Endpoint is the configured endpoint (normalised, no trailing slash).
func (c *Client) Endpoint() string { return c.endpoint.String() }

// Request is one sandbox to create. OrgID and APIKey, when set, replace
// the configured credentials (seed 001's per-request authentication).
type Request struct {
	Name           string
	Shape          string
	MaxLifeSeconds int
	ProjectID      string
	OrgID          string
	APIKey         string
}

// Created is the sandbox the API made.
type Created struct {
	ID        string
	Name      string
	Shape     string
	ExpiresAt string
	// From the shape: os, virtualization, architecture, hardware encoding.
	OS                          string
	Virtualization              string
	Architecture                string
	HardwareAcceleratedEncoding bool
	// Requested is the shape the request named when another was used
	// (Config.Shape, because the endpoint does not offer it); else "".
	Requested string
}

// Error is a refusal or failure of the sandbox API, with the HTTP status
// the dispatcher should answer: the API's own 4xx (bad request, wrong
// credentials, quota), 502 when the API failed or could not be reached,
// 504 when it did not answer in time.
type Error struct {
	Status  int
	Code    string
	Message string
}

func (e *Error) Error() string { return e.Message }

// ErrNoCredentials: neither the request nor the configuration has an org
// id and an API key.
var ErrNoCredentials = &Error{Status: http.StatusBadRequest, Code: "INVALID_ARGUMENT",
	Message: "no Lybic credentials: pass authentication {api_key, org_id} or configure the dispatcher's (LYBIC_ORG_ID, LYBIC_API_KEY)"}

// Create makes a sandbox. The request's limits are the caller's to check
// (MaxLifeSeconds); an empty shape is Config.Shape, else DefaultShape.
func (c *Client) Create(ctx context.Context, r Request) (*Created, error) {
	org, key := r.OrgID, r.APIKey
	if org == "" {
		org = c.cfg.OrgID
	}
	if key == "" {
		key = c.cfg.APIKey
	}
	if org == "" || key == "" {
		return nil, ErrNoCredentials
	}
	ctx, cancel := context.WithTimeout(ctx, c.cfg.Timeout)
	defer cancel()
	shape, requested := r.Shape, ""
	if shape == "" {
		shape = c.cfg.Shape
		if shape == "" {
			shape = DefaultShape
		}
	} else if c.cfg.Shape != "" && shape != c.cfg.Shape {
		// Only with a fallback shape is the list worth asking for: without
		// one, the API's own refusal of an unknown shape says it.
		offered, err := c.shapes(ctx, org, key)
		if err != nil {
			return nil, err
		}
		if len(offered) > 0 && !slices.Contains(offered, shape) {
			shape, requested = c.cfg.Shape, r.Shape
		}
	}
	life := r.MaxLifeSeconds
	if life == 0 {
		life = DefaultLifeSeconds
	}
	body := map[string]any{"name": r.Name, "shape": shape, "maxLifeSeconds": life}
	if body["name"] == "" {
		body["name"] = "sandbox"
	}
	if r.ProjectID != "" {
		body["projectId"] = r.ProjectID
	}
	var sb struct {
		ID        string `json:"id"`
		Name      string `json:"name"`
		ShapeName string `json:"shapeName"`
		ExpiresAt string `json:"expiresAt"`
		Shape     *struct {
			OS                          string `json:"os"`
			Virtualization              string `json:"virtualization"`
			Architecture                string `json:"architecture"`
			HardwareAcceleratedEncoding bool   `json:"hardwareAcceleratedEncoding"`
		} `json:"shape"`
	}
	if err := c.call(ctx, http.MethodPost, "/api/orgs/"+url.PathEscape(org)+"/sandboxes", key, body, &sb); err != nil {
		return nil, err
	}
	if sb.ID == "" {
		return nil, &Error{Status: http.StatusBadGateway, Code: "BAD_GATEWAY", Message: "the sandbox API answered without a sandbox id"}
	}
	out := &Created{ID: sb.ID, Name: sb.Name, Shape: sb.ShapeName, ExpiresAt: sb.ExpiresAt, Requested: requested}
	if out.Shape == "" {
		out.Shape = shape
	}
	if s := sb.Shape; s != nil {
		out.OS, out.Virtualization, out.Architecture, out.HardwareAcceleratedEncoding = s.OS, s.Virtualization, s.Architecture, s.HardwareAcceleratedEncoding
	}
	return out, nil
}

// shapes lists the names of the shapes the endpoint offers.
func (c *Client) shapes(ctx context.Context, org, key string) ([]string, error) {
	var rows []struct {
		Name string `json:"name"`
	}
	if err := c.call(ctx, http.MethodGet, "/api/orgs/"+url.PathEscape(org)+"/shapes", key, nil, &rows); err != nil {
		return nil, err
	}
	names := make([]string, 0, len(rows))
	for _, r := range rows {
		names = append(names, r.Name)
	}
	return names, nil
}

// call sends one request and decodes a 2xx JSON answer into out; any other
// answer becomes an *Error.
func (c *Client) call(ctx context.Context, method, path, key string, in, out any) error {
	var rd io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.endpoint.String()+path, rd)
	if err != nil {
		return err
	}
	req.Header.Set("x-api-key", key)
	req.Header.Set("Accept", "application/json")
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.cfg.HTTP.Do(req)
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			return &Error{Status: http.StatusGatewayTimeout, Code: "SANDBOX_API_TIMEOUT", Message: "the sandbox API at " + c.endpoint.Host + " did not answer in time"}
		}
		// The transport error names the host, never the key (a header).
		return &Error{Status: http.StatusBadGateway, Code: "SANDBOX_API_UNREACHABLE", Message: "the sandbox API at " + c.endpoint.Host + " could not be reached"}
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return &Error{Status: http.StatusBadGateway, Code: "SANDBOX_API_ERROR", Message: "reading the sandbox API's answer: " + err.Error()}
	}
	if resp.StatusCode/100 != 2 {
		var e struct {
			Code    string `json:"code"`
			Message string `json:"message"`
		}
		_ = json.Unmarshal(b, &e)
		msg := strings.TrimSpace(e.Message)
		if msg == "" {
			msg = http.StatusText(resp.StatusCode)
		}
		status := resp.StatusCode
		if status/100 != 4 {
			status = http.StatusBadGateway // the API failed, not the client
		}
		code := e.Code
		if code == "" {
			code = "SANDBOX_API_ERROR"
		}
		return &Error{Status: status, Code: code, Message: fmt.Sprintf("the sandbox API refused: %s (HTTP %d)", msg, resp.StatusCode)}
	}
	if err := json.Unmarshal(b, out); err != nil {
		return &Error{Status: http.StatusBadGateway, Code: "SANDBOX_API_ERROR", Message: "the sandbox API answered with invalid JSON"}
	}
	return nil
}
