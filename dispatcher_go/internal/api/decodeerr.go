package api

import (
	"bytes"
	"context"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// A request that does not decode (a string that is not UTF-8, bytes that
// are not protobuf) is the caller's mistake: INVALID_ARGUMENT. grpc-go
// words a codec's error as INTERNAL whatever it is, and for a unary call
// before any interceptor runs, so the codec does not fail: it empties the
// message it was decoding into and marks it with the error, and the first
// place each received message passes right after its decode turns the mark
// into the status: the first unary interceptor (unaryDecode), a client
// stream's RecvMsg (sizedStream, size.go) and, for the commander services,
// which streamSize leaves unwrapped, their streams' receives (chatStream,
// connectStream). The message text stays grpc-go's ("grpc:
// failed to unmarshal the received message: …"), which the session's
// undecodable recognises.
//
// The mark lives in the message itself, as its only unknown field, with
// field number 0: no decode can produce that (protobuf refuses field 0,
// and the hand decoder keeps no unknown fields), and it goes away with the
// message when grpc-go fails the call after the decode (a second request
// message on a unary call, a cancel) and nothing looks at it.

// decodeMark is the start of a mark: field 0, length-delimited.
var decodeMark = protowire.AppendTag(nil, 0, protowire.BytesType)

// noteDecodeFailure empties v and marks it with err; false if v is not a
// protobuf message (it cannot carry a mark; the codec returns err).
func noteDecodeFailure(v any, err error) bool {
	m, ok := v.(proto.Message)
	if !ok {
		return false
	}
	proto.Reset(m)
	m.ProtoReflect().SetUnknown(protoreflect.RawFields(protowire.AppendString(bytes.Clone(decodeMark), err.Error())))
	return true
}

// decodeFailure returns, and removes, the decode failure marked on v as an
// INVALID_ARGUMENT status; nil if v decoded.
func decodeFailure(v any) error {
	m, ok := v.(proto.Message)
	if !ok {
		return nil
	}
	r := m.ProtoReflect()
	u := r.GetUnknown()
	if len(u) == 0 || !bytes.HasPrefix(u, decodeMark) {
		return nil
	}
	text, n := protowire.ConsumeString(u[len(decodeMark):])
	if n < 0 {
		text = "undecodable"
	}
	r.SetUnknown(nil)
	return status.Error(codes.InvalidArgument, "grpc: failed to unmarshal the received message: "+text)
}

// unaryDecode is the first unary interceptor: a request that did not
// decode gets INVALID_ARGUMENT.
func unaryDecode(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if err := decodeFailure(req); err != nil {
		return nil, err
	}
	return handler(ctx, req)
}
